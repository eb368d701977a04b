"""A Hugging Face judge (random tiny Qwen2 with a BPE tokenizer.json and a chat template in
tokenizer_config.json, written by our exporter: no torch needed) goes through the same
code path as an rlhf_jax run, its chat template rendered as transformers renders it."""

import json
import os

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import judge
from rlhf_jax.feedback import models
from rlhf_jax.feedback import revision
from rlhf_jax.interop import hf, hf_config
from tests.feedback import tiny
from tests.feedback.test_constitution import DEFAULT

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_tokenizer(path):
  tok = Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["The film was a joy. Review (A): the acting was dull.",
                           "Question: Which review is better? Answer: (A) or (B)"] * 10, trainer)
  tok.save(str(path))
  return tok


@pytest.fixture(scope="module")
def hf_judge(tmp_path_factory):
  """(HF dir, our model, its params, the raw tokenizer)."""
  root = tmp_path_factory.mktemp("hf_judge")
  tok = write_tokenizer(root / "tokenizer.json")
  vocab = tok.get_vocab_size()
  cfg = dict(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=512, tie_word_embeddings=True)
  mc = hf_config.model_config_from_hf(cfg)
  model, params = tiny.random_params(mc, seed=5)
  out = str(root / "judge")
  ids = {f"{k}_token_id": tok.token_to_id(t)
         for k, t in (("pad", "<pad>"), ("bos", "<s>"), ("eos", "<|im_end|>"))}
  hf.save_hf(params, mc, out, model_type="qwen2", extra_config=ids,
             tokenizer_path=str(root / "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    eos = {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False,   # older form
           "normalized": False, "rstrip": False, "single_word": False, "special": True}
    json.dump({"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": eos,
               "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  return out, model, params, tok


def test_hf_judge_probabilities_match_hand_computed_softmax(hf_judge):
  path, model, params, tok = hf_judge
  lm = models.load(path)
  assert lm.kind == "hf" and lm.chat_template == CHAT_TEMPLATE
  assert (lm.tokenizer.bos_id, lm.tokenizer.eos_id, lm.tokenizer.pad_id) == (
      tok.token_to_id("<s>"), tok.token_to_id("<|im_end|>"), tok.token_to_id("<pad>"))
  c = constitution_lib.load(DEFAULT)
  fmt = constitution_lib.make_format(c, "auto", lm.chat_template, lm.special_tokens)
  assert fmt.kind == "chat"
  prompt, a, b = "The film", " was a joy.", " was dull."
  j = judge.judge_pairs(lm, c, fmt, [prompt], [a], [b], [(0,)])

  option_ids = [tok.token_to_id("A"), tok.token_to_id("B")]
  probs = []
  for first, second in ((a, b), (b, a)):
    text = ("<s><|im_start|>system\n" + c.formats["chat"]["system"] + "<|im_end|>\n"
            f"<|im_start|>user\nReview (A): {prompt}{first}\nReview (B): {prompt}{second}\n"
            f"Question: {c.principles[0].comparison_question}\n<|im_end|>\n"
            "<|im_start|>assistant\nAnswer: (")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == tok.token_to_id("<s>") and ids.count(tok.token_to_id("<|im_start|>")) == 3
    logits = tiny.full_forward_last_logits(model, params, ids)[option_ids]
    probs.append(np.exp(tiny.log_softmax(logits))[0])
  expected = (probs[0] + 1 - probs[1]) / 2
  np.testing.assert_allclose(j.prob_a, [expected], rtol=2e-5)
  assert abs(probs[0] - 0.5) > 1e-3         # the logits do differ between the options


def test_hf_model_samples_critiques_and_revisions(hf_judge):
  lm = models.load(hf_judge[0])
  c = constitution_lib.load(DEFAULT)
  fmt = constitution_lib.make_format(c, "chat", lm.chat_template, lm.special_tokens)
  records = revision.critique_and_revise(lm, c, fmt, ["The film"], jax.random.key(0),
                                         response_tokens=4, critique_tokens=4,
                                         revision_tokens=4, greedy=True, batch_size=1)
  assert records[0]["rounds"][0]["principle"] in ("harmless", "helpful")
  assert isinstance(records[0]["revision"], str)


def test_chat_template_renders_as_transformers_does(hf_judge):
  transformers = pytest.importorskip("transformers")
  path = hf_judge[0]
  theirs = transformers.AutoTokenizer.from_pretrained(path)
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U {x}"}]
  expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  lm = models.load(path)
  assert constitution_lib.render_chat(lm.chat_template, messages, lm.special_tokens) == expected
