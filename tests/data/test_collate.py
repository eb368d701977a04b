"""Collation layouts, checked array by array on hand-made examples."""

import dataclasses

import numpy as np
import pytest

from rlhf_jax import tokenizers
from rlhf_jax.data import collate


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
  """One id per lower-case letter (a=10, b=11, ...), specials away from 0/1/2."""
  pad_id: int = 7
  bos_id: int = 8
  eos_id: int = 9
  vocab_size: int = 36

  def encode(self, text):
    return [ord(c) - ord("a") + 10 for c in text]

  def decode(self, ids):
    return "".join(chr(i - 10 + ord("a")) for i in ids if i >= 10)


TOK = CharTokenizer()
P, B, E = 7, 8, 9
a, b, c, d, e, f, x, y, z = (ord(ch) - ord("a") + 10 for ch in "abcdefxyz")


def _check(out, expected):
  assert sorted(out) == sorted(expected)
  for k, v in expected.items():
    want = np.asarray(v, np.float32 if k == "margin" else np.int32)
    assert out[k].dtype == want.dtype, k
    np.testing.assert_array_equal(out[k], want, err_msg=k)


def test_lm_example_layout():
  out = collate.lm_example(TOK, "ab", "c", seq_len=8)
  _check(out, {"tokens": [B, a, b, c, E, P, P, P],
               "mask": [1, 1, 1, 1, 1, 0, 0, 0],
               "loss_mask": [0, 0, 0, 1, 1, 0, 0, 0]})


def test_lm_example_byte_tokenizer():
  out = collate.lm_example(tokenizers.ByteTokenizer(), "hi", "é", seq_len=7)
  _check(out, {"tokens": [1, ord("h") + 3, ord("i") + 3, 0xC3 + 3, 0xA9 + 3, 2, 0],
               "mask": [1, 1, 1, 1, 1, 1, 0],
               "loss_mask": [0, 0, 0, 1, 1, 1, 0]})


def test_lm_example_truncation_keeps_response_cuts_prompt_left():
  out = collate.lm_example(TOK, "abcdef", "xy", seq_len=6)
  _check(out, {"tokens": [B, e, f, x, y, E], "mask": [1] * 6, "loss_mask": [0, 0, 0, 1, 1, 1]})
  # Exactly room for BOS + response + EOS: the whole prompt goes.
  out = collate.lm_example(TOK, "abc", "xyz", seq_len=5)
  _check(out, {"tokens": [B, x, y, z, E], "mask": [1] * 5, "loss_mask": [0, 1, 1, 1, 1]})
  # One response token too many: None (the caller counts it).
  assert collate.lm_example(TOK, "", "xyzx", seq_len=5) is None
  assert collate.lm_example(TOK, "ab", "c", seq_len=2) is None


def test_text_example_loss_after_bos():
  out = collate.text_example(TOK, "abc", seq_len=7)
  _check(out, {"tokens": [B, a, b, c, E, P, P], "mask": [1, 1, 1, 1, 1, 0, 0],
               "loss_mask": [0, 1, 1, 1, 1, 0, 0]})
  out = collate.text_example(TOK, "abcdef", seq_len=4)  # keeps the beginning, no EOS
  _check(out, {"tokens": [B, a, b, c], "mask": [1, 1, 1, 1], "loss_mask": [0, 1, 1, 1]})


def test_preference_example_shares_the_cut_prompt():
  out = collate.preference_example(TOK, "abcd", "xyz", "x", seq_len=7, margin=1.5)
  # The longer response (3) leaves room for 2 prompt tokens in both sequences.
  _check(out, {
      "chosen_tokens": [B, c, d, x, y, z, E], "chosen_mask": [1] * 7,
      "chosen_loss_mask": [0, 0, 0, 1, 1, 1, 1],
      "rejected_tokens": [B, c, d, x, E, P, P], "rejected_mask": [1, 1, 1, 1, 1, 0, 0],
      "rejected_loss_mask": [0, 0, 0, 1, 1, 0, 0],
      "margin": 1.5})
  assert out["margin"].shape == ()
  assert collate.preference_example(TOK, "a", "x", "xyzxyz", seq_len=7) is None
  assert collate.preference_example(TOK, "", "x", "xyzxy", seq_len=7)["margin"] == 0.0


def test_prompt_example_left_padded():
  _check(collate.prompt_example(TOK, "ab", prompt_len=5),
         {"prompt_tokens": [P, P, B, a, b], "prompt_mask": [0, 0, 1, 1, 1]})
  _check(collate.prompt_example(TOK, "abcdef", prompt_len=4),
         {"prompt_tokens": [B, d, e, f], "prompt_mask": [1, 1, 1, 1]})
  _check(collate.prompt_example(TOK, "", prompt_len=3),
         {"prompt_tokens": [P, P, B], "prompt_mask": [0, 0, 1]})
  with pytest.raises(ValueError, match="prompt_len must be >= 1"):
    collate.prompt_example(TOK, "a", prompt_len=0)


def test_make_transform():
  lm = collate.make_transform("demonstration", TOK, seq_len=8)
  _check(lm({"prompt": "ab", "response": "c"}), collate.lm_example(TOK, "ab", "c", 8))
  pref = collate.make_transform("preference", TOK, seq_len=7)
  _check(pref({"prompt": "abcd", "chosen": "xyz", "rejected": "x", "margin": 1.5}),
         collate.preference_example(TOK, "abcd", "xyz", "x", 7, 1.5))
  text = collate.make_transform("text", TOK, seq_len=7)
  _check(text({"text": "abc"}), collate.text_example(TOK, "abc", 7))
  prompt = collate.make_transform("prompt", TOK, prompt_len=5)
  _check(prompt({"prompt": "ab"}), collate.prompt_example(TOK, "ab", 5))
  with pytest.raises(ValueError, match="prompt_len is required"):
    collate.make_transform("prompt", TOK, seq_len=5)
  with pytest.raises(ValueError, match="unknown kind 'images'"):
    collate.make_transform("images", TOK, seq_len=5)
