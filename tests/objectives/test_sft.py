"""Tests for rlhf_jax.objectives.sft against NumPy formulas and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.objectives import sft
from tests.numerics import fd_grad


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_token_logprobs(logits, tokens):
  lp = np_log_softmax(logits)[:, :-1]
  b, t = np.meshgrid(np.arange(tokens.shape[0]), np.arange(tokens.shape[1] - 1), indexing='ij')
  return lp[b, t, tokens[:, 1:]]


def make_batch(seed=0, batch=3, seq=6, vocab=7):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, seq, vocab)).astype(np.float32) * 3
  tokens = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
  loss_mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]], np.int32)
  return logits, tokens, loss_mask[:batch, :seq]


def test_token_logprobs_matches_numpy():
  logits, tokens, _ = make_batch()
  out = sft.token_logprobs(logits, tokens)
  assert out.shape == (3, 5) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_token_logprobs(logits, tokens), rtol=1e-5, atol=1e-5)


def test_token_logprobs_hand_value_and_stability():
  # Two equal logits: log-prob 0.5 each; a huge shared offset must not overflow.
  logits = np.array([[[1e4, 1e4, -1e4], [0., 0., 0.]]], np.float32)
  tokens = np.array([[2, 1]], np.int32)
  np.testing.assert_allclose(sft.token_logprobs(logits, tokens), [[np.log(0.5)]], rtol=1e-6)


def test_token_logprobs_bfloat16_upcast():
  logits, tokens, _ = make_batch()
  out = sft.token_logprobs(jnp.asarray(logits, jnp.bfloat16), tokens)
  assert out.dtype == jnp.float32
  ref = np_token_logprobs(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32), tokens)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_token_entropy():
  assert np.isclose(sft.token_entropy(np.zeros((5,), np.float32)), np.log(5.0))
  # A -inf logit has p = 0 and contributes 0 log 0 = 0, not NaN.
  np.testing.assert_allclose(sft.token_entropy(np.array([0., 0., -np.inf], np.float32)), np.log(2.0),
                             rtol=1e-6)
  logits, _, _ = make_batch()
  lp = np_log_softmax(logits)
  np.testing.assert_allclose(sft.token_entropy(logits), -(np.exp(lp) * lp).sum(-1), rtol=1e-5)


def test_sequence_logprobs_matches_numpy():
  logits, tokens, loss_mask = make_batch()
  ref = (np_token_logprobs(logits, tokens) * loss_mask[:, 1:]).sum(-1)
  np.testing.assert_allclose(sft.sequence_logprobs(logits, tokens, loss_mask), ref, rtol=1e-5)


def test_sft_loss_matches_numpy():
  logits, tokens, loss_mask = make_batch()
  loss, metrics = sft.sft_loss(logits, tokens, loss_mask)
  w = loss_mask[:, 1:]
  nll = -np_token_logprobs(logits, tokens)
  np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=1e-5)
  assert metrics['num_target_tokens'] == 9
  correct = logits[:, :-1].argmax(-1) == tokens[:, 1:]
  np.testing.assert_allclose(metrics['accuracy'], (correct * w).sum() / w.sum(), rtol=1e-6)


def test_sft_loss_hand_example():
  # vocab 2; position 0 predicts token 1 with p = sigmoid(2); position 1 is not a target.
  logits = np.array([[[0., 2.], [5., 0.], [0., 0.]]], np.float32)
  tokens = np.array([[0, 1, 1]], np.int32)
  loss_mask = np.array([[0, 1, 0]], np.int32)
  loss, metrics = sft.sft_loss(logits, tokens, loss_mask)
  np.testing.assert_allclose(loss, np.log1p(np.exp(-2.0)), rtol=1e-6)
  assert metrics['accuracy'] == 1.0 and metrics['num_target_tokens'] == 1


def test_sft_loss_empty_mask_is_finite():
  logits, tokens, loss_mask = make_batch()
  loss, metrics = sft.sft_loss(logits, tokens, np.zeros_like(loss_mask))
  assert loss == 0.0 and metrics['num_target_tokens'] == 0


def test_sft_loss_gradient_finite_differences_and_masking():
  logits, tokens, loss_mask = make_batch(batch=2, seq=4, vocab=3)
  with jax.enable_x64(True):
    f = lambda x: sft.sft_loss(x, tokens, loss_mask)[0]
    x = logits.astype(np.float64)
    g = np.asarray(jax.grad(f)(x))
    np.testing.assert_allclose(g, fd_grad(f, x), rtol=1e-6, atol=1e-8)
  # Position t is graded only through target t+1: zero gradient where loss_mask[t+1] == 0,
  # and at the last position (it predicts nothing).
  weight = np.concatenate([loss_mask[:, 1:], np.zeros((2, 1), np.int32)], axis=1)
  assert np.all(g[weight == 0] == 0)
  assert np.all(np.abs(g[weight == 1]).sum(-1) > 0)
