"""Testbed policy helpers on a tiny model trained for a few steps through the loop."""

import atexit
import functools
import json
import os
import shutil
import tempfile
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from configs import sft as sft_config
from rlhf_jax import tokenizers
from rlhf_jax.stages import sft
from rlhf_jax.testbed import gold_reward
from rlhf_jax.testbed import policy as policy_lib
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import loop

MAX_NEW = 12
PROMPT_LEN = 16
TOK = tokenizers.ByteTokenizer()


def tiny_config():
  c = sft_config.get_config()
  c.model = base.model_config("tiny")
  c.data.update(corpus_train=500, corpus_test=60, batch_size=8, eval_batch_size=8, seq_len=96,
                prompt_len=PROMPT_LEN)
  c.train.update(num_steps=4, log_every=2, eval_every=0, checkpoint_every=4, eval_batches=1)
  c.optimizer.update(warmup_steps=1, learning_rate=3e-3)
  c.sampling.update(max_new_tokens=MAX_NEW, eval_batch_size=8)
  return c


@functools.cache
def trained_run():
  """(workdir, params of the final train state), trained once per process."""
  workdir = tempfile.mkdtemp(prefix="test_policy_")
  atexit.register(shutil.rmtree, workdir, ignore_errors=True)
  config = tiny_config()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  captured = {}

  def evaluate(config, state, data, mesh, rng):   # the loop's final eval sees the final state
    captured["params"] = jax.device_get(state.params)
    return sft.evaluate(config, state, data, mesh, rng)

  stage = types.SimpleNamespace(make_data=sft.make_data, init=sft.init,
                                make_step=sft.make_step, evaluate=evaluate)
  loop.train(config, workdir, stage)
  return workdir, captured["params"]


@pytest.fixture(scope="module")
def run():
  return trained_run()


@pytest.fixture(scope="module")
def loaded(run):
  return policy_lib.load_policy(run[0])


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


PROMPTS = ["The film", "I really loved this", "Honestly, the acting was", "Bad", "A"]


def test_load_policy_round_trip(run, loaded):
  workdir, trained = run
  config, model, params = loaded
  assert config.data.corpus_train == 500 and model.config.embed_dim == 64
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), trained)
  tokens = jnp.zeros((1, 4), jnp.int32)
  fresh = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens, tokens,
                                            jnp.ones_like(tokens))["params"])
  diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                      jax.device_get(params), jax.device_get(fresh))
  assert max(jax.tree.leaves(diff)) > 1e-3       # really the trained params, not a fresh init


def test_load_policy_nested_under_policy(run, tmp_path):
  """A PPO checkpoint holds params {'policy', 'critic'}: the policy is loaded."""
  workdir, trained = run
  shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "config.json")
  state = {"params": {"policy": trained, "critic": {"w": np.ones((3,), np.float32)}}}
  with checkpoint_lib.manager(str(tmp_path), 1) as mngr:
    checkpoint_lib.save(mngr, 7, state, {})
  _, _, params = policy_lib.load_policy(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), trained)


def test_load_policy_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    policy_lib.load_policy(str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    policy_lib.load_policy(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    policy_lib.load_policy(str(tmp_path))


def test_generate_shapes_and_decoding(loaded):
  _, model, params = loaded
  out = policy_lib.generate(model, params, PROMPTS, TOK, jax.random.key(0),
                            max_new_tokens=MAX_NEW, batch_size=2, prompt_len=PROMPT_LEN)
  n = len(PROMPTS)
  assert len(out["texts"]) == n
  for key in ("response_tokens", "response_mask", "logprobs"):
    assert out[key].shape == (n, MAX_NEW), key
  assert out["prompt_tokens"].shape == out["prompt_mask"].shape == (n, PROMPT_LEN)
  assert out["logprobs"].dtype == np.float32 and out["response_tokens"].dtype == np.int32
  for i, prompt in enumerate(PROMPTS):
    real = out["prompt_tokens"][i][out["prompt_mask"][i] == 1]
    assert real.tolist() == [TOK.bos_id, *TOK.encode(prompt)[-(PROMPT_LEN - 1):]]  # cut left
    mask = out["response_mask"][i]
    assert np.all(np.diff(mask) <= 0) and mask[0] == 1          # a prefix of the response
    assert out["texts"][i] == TOK.decode(out["response_tokens"][i][mask == 1])
    assert np.all(out["logprobs"][i][mask == 0] == 0) and np.all(out["logprobs"][i][mask == 1] < 0)


def test_greedy_is_deterministic_and_batch_independent(loaded):
  _, model, params = loaded
  kw = dict(max_new_tokens=MAX_NEW, greedy=True, prompt_len=PROMPT_LEN)
  a = policy_lib.generate(model, params, PROMPTS, TOK, jax.random.key(0), batch_size=2, **kw)
  b = policy_lib.generate(model, params, PROMPTS, TOK, jax.random.key(7), batch_size=5, **kw)
  assert a["texts"] == b["texts"]
  np.testing.assert_array_equal(a["response_tokens"], b["response_tokens"])
  # Each greedy token is the argmax of an independent full forward pass.
  tokens = np.concatenate([a["prompt_tokens"], a["response_tokens"]], 1)
  mask = np.concatenate([a["prompt_mask"], a["response_mask"]], 1)
  logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens,
                                           np.maximum(np.cumsum(mask, 1) - 1, 0), mask)[0]["logits"])
  argmax = logits[:, PROMPT_LEN - 1:-1].argmax(-1)
  real = a["response_mask"] == 1
  np.testing.assert_array_equal(argmax[real], a["response_tokens"][real])


def test_sequence_logprobs_under_matches_sampler(loaded):
  _, model, params = loaded
  for temperature in (1.0, 0.7):
    out = policy_lib.generate(model, params, PROMPTS, TOK, jax.random.key(1), batch_size=5,
                              max_new_tokens=MAX_NEW, temperature=temperature,
                              prompt_len=PROMPT_LEN)
    logp = policy_lib.sequence_logprobs_under(
        model, params, out["prompt_tokens"], out["prompt_mask"], out["response_tokens"],
        out["response_mask"], temperature=temperature, batch_size=2)
    np.testing.assert_allclose(logp, out["logprobs"], atol=1e-5)
    # Independently: each sequence right-padded (positions 0, 1, ...), NumPy log-softmax.
    rows = [np.concatenate([out["prompt_tokens"][i][out["prompt_mask"][i] == 1],
                            out["response_tokens"][i][out["response_mask"][i] == 1]])
            for i in range(len(PROMPTS))]
    width = PROMPT_LEN + MAX_NEW
    tokens = np.stack([np.pad(r, (0, width - len(r))) for r in rows]).astype(np.int32)
    mask = np.stack([np.arange(width) < len(r) for r in rows]).astype(np.int32)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, tokens,
                                             np.tile(np.arange(width), (len(rows), 1)),
                                             mask)[0]["logits"])
    for i, ids in enumerate(rows):
      expected = np.take_along_axis(log_softmax(logits[i, :len(ids) - 1] / temperature),
                                    ids[1:, None], 1)[:, 0]
      r = int(out["response_mask"][i].sum())
      np.testing.assert_allclose(logp[i, :r], expected[-r:], atol=1e-5)
      assert np.all(logp[i, r:] == 0)


def test_evaluate_policy_kl_to_itself_is_zero(loaded):
  _, model, params = loaded
  kw = dict(max_new_tokens=MAX_NEW, batch_size=5, prompt_len=PROMPT_LEN, num_samples=2)
  result = policy_lib.evaluate_policy((model, params), (model, params), PROMPTS, TOK,
                                      jax.random.key(2), **kw)
  assert abs(result["kl"]) < 1e-5 and result["kl_stderr"] < 1e-5
  assert json.loads(json.dumps(result)) == result
  # Gold of prompt + response, recomputed from the same samples.
  out = policy_lib.generate(model, params, PROMPTS, TOK, jax.random.key(2), batch_size=5,
                            max_new_tokens=MAX_NEW, prompt_len=PROMPT_LEN)
  gold = gold_reward.gold_reward([p + t for p, t in zip(PROMPTS, out["texts"])])
  assert result["num"] == len(PROMPTS)
  np.testing.assert_allclose(result["gold_mean"], gold.astype(np.float64).mean(), atol=1e-6)
  np.testing.assert_allclose(result["length_mean"], out["response_mask"].sum(1).mean())
  assert [s["response"] for s in result["samples"]] == out["texts"][:2]
  no_ref = policy_lib.evaluate_policy((model, params), None, PROMPTS, TOK, jax.random.key(2), **kw)
  assert no_ref["kl"] is None and no_ref["kl_note"] == "no reference"
  assert no_ref["gold_mean"] == result["gold_mean"]
  # Against another policy the KL estimate is its NumPy formula.
  other = jax.tree.map(lambda x: x * 0.5, params)
  result = policy_lib.evaluate_policy((model, params), (model, other), PROMPTS, TOK,
                                      jax.random.key(2), **kw)
  ref = policy_lib.sequence_logprobs_under(model, other, out["prompt_tokens"], out["prompt_mask"],
                                           out["response_tokens"], out["response_mask"])
  per_seq = ((out["logprobs"] - ref) * out["response_mask"]).sum(1)
  np.testing.assert_allclose(result["kl"], per_seq.mean(), rtol=1e-5)
  np.testing.assert_allclose(result["kl_stderr"], per_seq.std(ddof=1) / np.sqrt(len(PROMPTS)),
                             rtol=1e-4)


def test_heldout_prompts(run):
  workdir, _ = run
  config = policy_lib.read_config(workdir)
  prompts = policy_lib.heldout_prompts(config, os.path.join(workdir, "data"), "test", 5)
  later = policy_lib.heldout_prompts(config, os.path.join(workdir, "data"), "test", 3, start=2)
  assert len(prompts) == 5 and prompts[2:] == later
  with pytest.raises(ValueError, match="has 60 prompts"):
    policy_lib.heldout_prompts(config, os.path.join(workdir, "data"), "test", 61)
