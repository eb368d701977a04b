"""Tokenizers: byte round trip, special ids, tokenizer.json built on the fly."""

import json

import ml_collections
import pytest
import tokenizers as hf_tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from configs import base
from rlhf_jax import tokenizers

TEXT = "héllo wörld, 日本語 🙂\n\ttabs & NUL\x00 end"


def test_byte_tokenizer_ids_are_utf8_bytes_plus_3():
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(TEXT)
  assert ids == [b + 3 for b in TEXT.encode("utf-8")]
  assert all(isinstance(i, int) for i in ids)
  assert tok.decode(ids) == TEXT
  assert tok.encode("") == [] and tok.decode([]) == ""


def test_byte_tokenizer_special_ids():
  tok = tokenizers.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  assert tok.vocab_size <= base.get_config().model.vocab_size
  assert isinstance(tok, tokenizers.Tokenizer)
  # Specials and ids past the 256 bytes (padded model vocab) are dropped by decode.
  ids = [1] + tok.encode("ab") + [2, 0, 259, 263, 0]
  assert tok.decode(ids) == "ab"


def test_byte_tokenizer_invalid_utf8_is_replaced():
  tok = tokenizers.ByteTokenizer()
  # 0xE6 0x97 are the first two bytes of a three-byte character, cut short.
  assert tok.decode([0xE6 + 3, 0x97 + 3, ord("a") + 3]) == "\ufffda"
  assert tok.decode([0xFF + 3]) == "\ufffd"


def _train_bpe(path, special_tokens):
  tok = hf_tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=special_tokens,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(["hello world", "héllo wörld 日本語", "the cat sat on the mat"] * 20,
                          trainer)
  tok.save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
  return _train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json",
                    ["<pad>", "<s>", "</s>"])


def test_json_tokenizer_round_trip_and_specials(bpe_path):
  tok = tokenizers.JsonTokenizer(bpe_path)
  raw = hf_tokenizers.Tokenizer.from_file(bpe_path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (
      raw.token_to_id("<pad>"), raw.token_to_id("<s>"), raw.token_to_id("</s>"))
  assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
  ids = tok.encode(TEXT)
  assert ids == raw.encode(TEXT, add_special_tokens=False).ids
  assert len(ids) < len(TEXT.encode("utf-8"))  # merges were learned and used
  assert tok.bos_id not in ids and tok.eos_id not in ids
  assert tok.decode(ids) == TEXT
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == TEXT
  assert isinstance(tok, tokenizers.Tokenizer)


def test_json_tokenizer_ids_from_arguments(bpe_path):
  tok = tokenizers.JsonTokenizer(bpe_path, pad_id=2, bos_id=0, eos_id=1)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (2, 0, 1)
  with pytest.raises(ValueError, match="eos_id=100000 outside"):
    tokenizers.JsonTokenizer(bpe_path, eos_id=100000)


def test_json_tokenizer_endoftext_and_missing_pad(tmp_path):
  vocab = {"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3}
  tok = hf_tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<|endoftext|>"])
  path = str(tmp_path / "tokenizer.json")
  tok.save(path)
  with pytest.raises(ValueError, match=r"cannot find a pad token.*pass pad_id="):
    tokenizers.JsonTokenizer(path)
  t = tokenizers.JsonTokenizer(path, pad_id=3)
  assert (t.pad_id, t.bos_id, t.eos_id) == (3, 0, 0)
  assert t.encode("hello world") == [1, 2]


def test_json_tokenizer_bad_files(tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.json at"):
    tokenizers.JsonTokenizer(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"not": "a tokenizer"}))
  with pytest.raises(ValueError, match=f"cannot load '{bad}'"):
    tokenizers.JsonTokenizer(str(bad))


def test_make_tokenizer(bpe_path):
  assert tokenizers.make_tokenizer(base.get_config().tokenizer) == tokenizers.ByteTokenizer()
  cfg = ml_collections.ConfigDict({"kind": "json", "path": bpe_path})
  tok = tokenizers.make_tokenizer(cfg)
  assert isinstance(tok, tokenizers.JsonTokenizer) and tok.decode(tok.encode("the cat")) == "the cat"
  assert tokenizers.make_tokenizer({"kind": "json", "path": bpe_path, "pad_id": 2}).pad_id == 2
  with pytest.raises(ValueError, match="tokenizer.kind: unknown kind 'sentencepiece'"):
    tokenizers.make_tokenizer({"kind": "sentencepiece", "path": ""})
