"""Sampler tests against step-by-step full forward passes (no KV cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.model import sampling
from tests.model.test_transformer import GPT2, LLAMA, forward, left_padded, random_params

NO_EOS = -1  # outside the vocabulary: sequences never stop early
PAD = 0
# Cheaper compiles for these tiny programs; each sampler call below compiles once anyway.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def prompts(batch=3, p=5, vocab=48, seed=0):
  lengths = [p, 3, 1, 4, 2, 5, 1, 3][:batch] if batch <= 8 else [1 + i % p for i in range(batch)]
  tokens, mask, _ = left_padded(np.random.default_rng(seed), lengths, p, vocab)
  return tokens, mask


def compiled_sample(params, model, tokens, mask, rng, **options):
  """`sampling.sample(...)` compiled with FAST_COMPILE for these shapes and `options`."""
  fn = lambda params, tokens, mask, rng: sampling.sample(params, model, tokens, mask, rng,
                                                         **options)
  args = (params, jnp.asarray(tokens), jnp.asarray(mask), rng)
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def full_logits(model, params, tokens, mask):
  """[B, T, V] logits of one uncached forward pass."""
  positions = sampling.prompt_positions(jnp.asarray(mask))
  return np.asarray(forward(model, params, tokens, positions, mask)[0]["logits"])


def response_logits(model, params, out, p):
  """Logits that predicted each response token, from one forward pass: [B, N, V]."""
  logits = full_logits(model, params, out.tokens, out.mask)
  n = out.response_tokens.shape[1]
  return logits[:, p - 1:p - 1 + n]


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def take(x, tokens):
  return np.take_along_axis(x, np.asarray(tokens)[..., None], -1)[..., 0]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_greedy_matches_stepwise_argmax(name):
  config = {"llama": LLAMA, "gpt2": GPT2}[name]
  model, params = random_params(config)
  tokens, mask = prompts()
  out = sampling.sample(params, model, tokens, mask, jax.random.key(0), max_new_tokens=6,
                        greedy=True, eos_id=NO_EOS, pad_id=PAD)
  # One uncached forward pass per step over a fixed-length buffer (one compile);
  # causality makes the not-yet-written slots irrelevant.
  seq = np.concatenate([tokens, np.zeros((3, 6), np.int32)], 1)
  seq_mask = np.concatenate([mask, np.ones((3, 6), np.int32)], 1)
  expected_lp = []
  for i in range(6):
    logits = full_logits(model, params, seq, seq_mask)[:, 4 + i]
    seq[:, 5 + i] = logits.argmax(-1)
    expected_lp.append(take(log_softmax(logits.astype(np.float64)), seq[:, 5 + i]))
  np.testing.assert_array_equal(out.response_tokens, seq[:, 5:])
  np.testing.assert_allclose(out.logprobs, np.stack(expected_lp, 1), atol=1e-5)
  np.testing.assert_array_equal(out.tokens, seq)
  np.testing.assert_array_equal(out.mask, seq_mask)
  np.testing.assert_array_equal(out.response_mask, np.ones((3, 6)))
  assert out.logprobs.dtype == jnp.float32 and out.tokens.shape == (3, 11)
  assert len(set(np.asarray(out.response_tokens).ravel())) > 3  # not a constant output


def test_logprobs_are_unfiltered_tempered_log_softmax():
  model, params = random_params(LLAMA)
  tokens, mask = prompts(batch=4)
  temperature, top_k = 0.7, 5
  out = sampling.sample(params, model, tokens, mask, jax.random.key(1), max_new_tokens=6,
                        temperature=temperature, top_k=top_k, top_p=0.9, eos_id=NO_EOS,
                        pad_id=PAD)
  logits = response_logits(model, params, out, 5).astype(np.float64)
  expected = take(log_softmax(logits / temperature), out.response_tokens)
  np.testing.assert_allclose(out.logprobs, expected, atol=1e-5)
  rank = (logits > take(logits, out.response_tokens)[..., None]).sum(-1)
  assert rank.max() < top_k


def test_top_k_one_and_small_top_p_equal_greedy():
  model, params = random_params(LLAMA)
  tokens, mask = prompts()
  run = lambda **kw: compiled_sample(params, model, tokens, mask, jax.random.key(2),
                                     max_new_tokens=6, eos_id=NO_EOS, pad_id=PAD, **kw)
  greedy, top_k_1 = run(greedy=True), run(top_k=1)
  for out in (top_k_1, run(top_p=1e-3)):
    np.testing.assert_array_equal(out.response_tokens, greedy.response_tokens)
  np.testing.assert_allclose(top_k_1.logprobs, greedy.logprobs, atol=1e-6)
  sampled = run(temperature=1.5)
  assert np.any(sampled.response_tokens != greedy.response_tokens)


def test_top_k_support_and_temperature_distribution():
  """Many rows of one prompt: the first token's frequencies match softmax(logits / T)
  restricted to the top k, and later tokens never leave the top k."""
  model, params = random_params(LLAMA)
  b, k, temperature = 2000, 4, 2.0
  tokens, mask = prompts(batch=1)
  tokens, mask = np.repeat(tokens, b, 0), np.repeat(mask, b, 0)
  logits = full_logits(model, params, tokens[:1], mask[:1])[0, -1].astype(np.float64)
  top = np.argsort(-logits)[:k]
  for top_k in (0, k):
    out = compiled_sample(params, model, tokens, mask, jax.random.key(3), max_new_tokens=3,
                          temperature=temperature, top_k=top_k, eos_id=NO_EOS, pad_id=PAD)
    probs = np.exp(log_softmax(logits / temperature))
    if top_k:
      probs = np.where(np.isin(np.arange(len(probs)), top), probs, 0)
      probs /= probs.sum()
    freq = np.bincount(np.asarray(out.response_tokens[:, 0]), minlength=len(probs)) / b
    np.testing.assert_array_less(np.abs(freq - probs), 4 * np.sqrt(probs * (1 - probs) / b)
                                 + 1e-9)
    assert np.isin(out.response_tokens[:, 0], top).all() == bool(top_k)
  # Later steps (different contexts per row) stay in each row's own top k.
  logits = response_logits(model, params, out, 5)
  rank = (logits > take(logits, out.response_tokens)[..., None]).sum(-1)
  assert rank.max() == k - 1


def test_top_p_keeps_the_nucleus():
  model, params = random_params(LLAMA)
  b, temperature = 2000, 2.0
  tokens, mask = prompts(batch=1)
  tokens, mask = np.repeat(tokens, b, 0), np.repeat(mask, b, 0)
  logits = full_logits(model, params, tokens[:1], mask[:1])[0, -1].astype(np.float64)
  probs = np.exp(log_softmax(logits / temperature))
  order = np.argsort(-probs)
  cum = np.cumsum(probs[order])
  top_p = float((cum[1] + cum[2]) / 2)  # nucleus: the 3 most likely tokens
  out = compiled_sample(params, model, tokens, mask, jax.random.key(4), max_new_tokens=1,
                        temperature=temperature, top_p=top_p, eos_id=NO_EOS, pad_id=PAD)
  freq = np.bincount(np.asarray(out.response_tokens[:, 0]), minlength=len(probs)) / b
  nucleus = np.zeros_like(probs)
  nucleus[order[:3]] = probs[order[:3]] / cum[2]
  assert set(np.nonzero(freq)[0]) == set(order[:3])
  np.testing.assert_array_less(np.abs(freq - nucleus),
                               4 * np.sqrt(nucleus * (1 - nucleus) / b) + 1e-9)


def test_eos_stops_each_sequence():
  model, params = random_params(LLAMA)
  tokens, mask = prompts()
  run = lambda eos: sampling.sample(params, model, tokens, mask, jax.random.key(0),
                                    max_new_tokens=6, greedy=True, eos_id=eos, pad_id=PAD)
  free = np.asarray(run(NO_EOS).response_tokens)
  # EOS := the token that stops most rows, none at step 0 (so stopping is observable).
  first = lambda t, row: (np.nonzero(free[row] == t)[0].tolist() or [None])[0]
  candidates = [t for t in set(free.ravel()) if all(first(t, r) != 0 for r in range(3))]
  eos = int(max(candidates, key=lambda t: sum(first(t, r) is not None for r in range(3))))
  stops = [first(eos, r) for r in range(3)]
  assert sum(s is not None for s in stops) >= 2 and None in stops, stops
  out = run(eos)
  for row in range(3):
    hits = np.nonzero(free[row] == eos)[0]
    stop = hits[0] if len(hits) else 5
    keep = np.arange(6) <= stop
    np.testing.assert_array_equal(out.response_mask[row], keep)
    np.testing.assert_array_equal(out.response_tokens[row], np.where(keep, free[row], PAD))
    assert np.all(out.logprobs[row][~keep] == 0) and np.all(out.logprobs[row][keep] < 0)
  np.testing.assert_array_equal(out.mask[:, 5:], out.response_mask)


def test_all_rows_stop_at_once():
  """Params whose logits strongly favour EOS: every row stops at step 0 and the loop exits."""
  model, params = random_params(GPT2)
  eos = 7
  params = dict(params)
  params["final_norm"] = {"scale": jnp.zeros(32), "bias": jnp.ones(32)}
  params["lm_head"] = {"kernel": jnp.zeros((32, 48)).at[:, eos].set(1.0)}  # logit 32 for eos
  tokens, mask = prompts()
  out = sampling.sample(params, model, tokens, mask, jax.random.key(5), max_new_tokens=5,
                        temperature=1.0, eos_id=eos, pad_id=PAD)
  np.testing.assert_array_equal(out.response_tokens, [[eos, 0, 0, 0, 0]] * 3)
  np.testing.assert_array_equal(out.response_mask, [[1, 0, 0, 0, 0]] * 3)
  np.testing.assert_allclose(out.logprobs[:, 0], -47 * np.exp(-32), rtol=1e-3, atol=1e-12)


def test_rng_determinism_and_jit_wrappers():
  model, params = random_params(LLAMA)
  tokens, mask = prompts()
  sampler = sampling.make_sampler(model, max_new_tokens=6, temperature=1.5, eos_id=NO_EOS,
                                  pad_id=PAD)
  a = sampler(params, tokens, mask, jax.random.key(6))
  b = sampler(params, tokens, mask, jax.random.key(6))
  c = sampler(params, tokens, mask, jax.random.key(7))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert np.mean(np.asarray(a.response_tokens) != np.asarray(c.response_tokens)) > 0.3
  # Usable inside a caller's jit.
  d = jax.jit(sampler)(params, tokens, mask, jax.random.key(6))
  np.testing.assert_array_equal(a.tokens, d.tokens)


def test_bad_arguments():
  model, params = random_params(LLAMA)
  tokens, mask = prompts()
  kw = dict(eos_id=NO_EOS, pad_id=PAD)
  cases = [(dict(max_new_tokens=40), "max_len"), (dict(max_new_tokens=0), "max_new_tokens"),
           (dict(max_new_tokens=2, temperature=0.0), "temperature"),
           (dict(max_new_tokens=2, top_k=-1), "top_k"),
           (dict(max_new_tokens=2, top_p=0.0), "top_p")]
  for extra, match in cases:
    with pytest.raises(ValueError, match=match):
      sampling.sample(params, model, tokens, mask, jax.random.key(0), **extra, **kw)
