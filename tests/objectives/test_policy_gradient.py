"""Tests for rlhf_jax.objectives.policy_gradient against NumPy formulas and hand values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import policy_gradient as pg
from tests.numerics import fd_grad

rng = np.random.default_rng(0)
MASK = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int32)
SHAPE = MASK.shape
LOGP = (-rng.uniform(0.1, 3.0, SHAPE)).astype(np.float32)
OLD = (LOGP + rng.normal(scale=0.3, size=SHAPE)).astype(np.float32)
REF = (LOGP + rng.normal(scale=0.5, size=SHAPE)).astype(np.float32)
ADV = rng.normal(size=SHAPE).astype(np.float32)


def test_whiten():
  x = rng.normal(3.0, 5.0, SHAPE).astype(np.float32)
  x[MASK == 0] = 1e6  # garbage outside the mask must not leak into the statistics
  w = np.asarray(pg.whiten(x, MASK))
  on = MASK == 1
  np.testing.assert_allclose(w[on].mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(w[on].std(), 1.0, rtol=1e-5)
  # The population std (ddof=0), not TRL's sample std (ddof=1).
  np.testing.assert_allclose(w[on], (x[on] - x[on].mean()) / x[on].std(ddof=0), rtol=1e-5,
                             atol=1e-6)
  assert np.all(w[~on] == 0)
  w = np.asarray(pg.whiten(x, MASK, shift_mean=False))
  np.testing.assert_allclose(w[on].mean(), x[on].mean(), rtol=1e-5)
  np.testing.assert_allclose(w[on].std(), 1.0, rtol=1e-5)


@pytest.mark.parametrize('kind', ['k1', 'k3', 'mse', 'abs'])
def test_kl_penalty_matches_numpy_and_is_zero_at_equality(kind):
  np.testing.assert_array_equal(pg.kl_penalty(LOGP, LOGP, kind), 0.0)
  d = LOGP.astype(np.float64) - REF  # log pi - log pi_ref
  ref = {'k1': d, 'k3': np.exp(-d) - 1 + d, 'mse': 0.5 * d ** 2, 'abs': np.abs(d)}[kind]
  np.testing.assert_allclose(pg.kl_penalty(LOGP, REF, kind), ref, rtol=1e-5, atol=1e-6)


def test_k1_and_k3_are_unbiased_for_kl():
  # E_{x ~ pi}[k] == KL(pi || pi_ref) exactly, which pins down the direction of both estimators.
  logp = np.log(np.array([0.5, 0.3, 0.2]))
  ref = np.log(np.array([0.2, 0.2, 0.6]))
  kl = np.sum(np.exp(logp) * (logp - ref))
  for kind in ('k1', 'k3'):
    est = np.sum(np.exp(logp) * np.asarray(pg.kl_penalty(logp.astype(np.float32),
                                                         ref.astype(np.float32), kind)))
    np.testing.assert_allclose(est, kl, rtol=1e-5)
  assert np.all(np.asarray(pg.kl_penalty(LOGP, REF, 'k3')) >= 0)
  with pytest.raises(ValueError, match="'k2'"):
    pg.kl_penalty(LOGP, REF, 'k2')


def test_shaped_rewards():
  scores = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
  out = np.asarray(pg.shaped_rewards(scores, LOGP, REF, MASK, kl_coef=0.1, kl_kind='k1'))
  expected = -0.1 * (LOGP.astype(np.float64) - REF) * MASK
  for b, last in enumerate([3, 1, 4, 0]):
    expected[b, last] += scores[b]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # An empty response gets nothing; logprobs == ref leaves only the score.
  empty = pg.shaped_rewards(scores[:1], LOGP[:1], REF[:1], np.zeros((1, 5), np.int32), 0.1)
  np.testing.assert_array_equal(empty, 0.0)
  only_score = pg.shaped_rewards(scores, LOGP, LOGP, MASK, 0.1, 'k3')
  np.testing.assert_allclose(np.asarray(only_score).sum(1), scores)


def np_gae(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards, np.float64)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    next_v, next_a = 0.0, 0.0
    for t in idx[::-1]:
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      next_a = delta + gamma * lam * next_a
      next_v = values[b, t]
      adv[b, t] = next_a
  return adv, (adv + values) * mask


def test_gae_hand_computed_three_steps():
  rewards = np.array([[1.0, 0.0, 2.0, 7.0]], np.float32)  # last step is padding with garbage
  values = np.array([[0.5, 1.0, 1.5, -9.0]], np.float32)
  mask = np.array([[1, 1, 1, 0]], np.int32)
  adv, ret = pg.gae(rewards, values, mask, gamma=0.9, lam=0.8)
  # delta_2 = 2 - 1.5 = 0.5;  delta_1 = 0.9 * 1.5 - 1 = 0.35;  delta_0 = 1 + 0.9 - 0.5 = 1.4
  # A_2 = 0.5;  A_1 = 0.35 + 0.72 * 0.5 = 0.71;  A_0 = 1.4 + 0.72 * 0.71 = 1.9112
  np.testing.assert_allclose(adv, [[1.9112, 0.71, 0.5, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[2.4112, 1.71, 2.0, 0.0]], rtol=1e-6)


def test_gae_matches_numpy_and_monte_carlo_limit():
  rewards = rng.normal(size=SHAPE).astype(np.float32)
  values = rng.normal(size=SHAPE).astype(np.float32)
  mask = MASK.copy()
  mask[2, 2] = 0  # a hole: skipped, the recursion passes over it
  adv, ret = pg.gae(rewards, values, mask, gamma=0.95, lam=0.9)
  ref_adv, ref_ret = np_gae(rewards, values, mask, 0.95, 0.9)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)
  # gamma = lam = 1: returns are the undiscounted reward-to-go.
  _, ret = pg.gae(rewards, values, MASK, gamma=1.0, lam=1.0)
  r = rewards * MASK
  np.testing.assert_allclose(ret, np.cumsum(r[:, ::-1], 1)[:, ::-1] * MASK, rtol=1e-5, atol=1e-5)


def np_ppo(logp, old, adv, mask, eps):
  ratio = np.exp(logp.astype(np.float64) - old)
  loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
  return (loss * mask).sum() / mask.sum(), ratio


def test_ppo_policy_loss_matches_numpy():
  loss, m = pg.ppo_policy_loss(LOGP, OLD, ADV, MASK, clip_eps=0.2)
  ref, ratio = np_ppo(LOGP, OLD, ADV, MASK, 0.2)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  on = MASK == 1
  clipped = -ADV * np.clip(ratio, 0.8, 1.2) > -ADV * ratio
  np.testing.assert_allclose(m['clipfrac'], clipped[on].mean(), rtol=1e-6)
  np.testing.assert_allclose(m['approx_kl'], ((ratio - 1) - np.log(ratio))[on].mean(), rtol=1e-5)
  np.testing.assert_allclose(m['ratio'], ratio[on].mean(), rtol=1e-5)
  # On-policy (ratio 1): loss = -mean advantage, nothing clipped, zero KL.
  loss, m = pg.ppo_policy_loss(LOGP, LOGP, ADV, MASK, 0.2)
  np.testing.assert_allclose(loss, -ADV[on].mean(), rtol=1e-5)
  assert m['clipfrac'] == 0 and m['approx_kl'] == 0 and m['ratio'] == 1


def test_ppo_policy_gradient_clipping_masking_and_finite_differences():
  logp = LOGP.copy()
  logp[MASK == 0] = np.nan  # garbage in padding
  g = np.asarray(jax.grad(lambda x: pg.ppo_policy_loss(x, OLD, ADV, MASK, 0.2)[0])(logp))
  assert np.all(np.isfinite(g)) and np.all(g[MASK == 0] == 0)
  ratio = np.exp(LOGP.astype(np.float64) - OLD)
  # Gradient vanishes exactly where the clipped term is active (the trust region).
  inactive = ((ADV > 0) & (ratio > 1.2)) | ((ADV < 0) & (ratio < 0.8))
  assert inactive[MASK == 1].any() and (~inactive[MASK == 1]).any()
  assert np.all(g[inactive] == 0) and np.all(g[(MASK == 1) & ~inactive] != 0)
  with jax.enable_x64(True):
    x = LOGP.astype(np.float64)
    f = lambda v: pg.ppo_policy_loss(v, OLD.astype(np.float64), ADV, MASK, 0.2)[0]
    np.testing.assert_allclose(jax.grad(f)(x), fd_grad(f, x), rtol=1e-5, atol=1e-9)


def test_ppo_value_loss():
  values = rng.normal(size=SHAPE).astype(np.float32)
  old = values + rng.normal(scale=0.5, size=SHAPE).astype(np.float32)
  ret = rng.normal(size=SHAPE).astype(np.float32)
  loss, m = pg.ppo_value_loss(values, old, ret, MASK, clip_eps=0.2)
  v64 = values.astype(np.float64)
  vc = np.clip(v64, old - 0.2, old + 0.2)
  per = 0.5 * np.maximum((v64 - ret) ** 2, (vc - ret) ** 2)
  on = MASK == 1
  np.testing.assert_allclose(loss, per[on].mean(), rtol=1e-5)
  np.testing.assert_allclose(m['clipfrac'], ((vc - ret) ** 2 > (v64 - ret) ** 2)[on].mean())
  with jax.enable_x64(True):
    f = lambda v: pg.ppo_value_loss(v, old.astype(np.float64), ret, MASK, 0.2)[0]
    g = np.asarray(jax.grad(f)(v64))
    np.testing.assert_allclose(g, fd_grad(f, v64), rtol=1e-5, atol=1e-9)
    assert np.all(g[~on] == 0)


def test_entropy_from_logits():
  logits = rng.normal(size=SHAPE + (6,)).astype(np.float32)
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  h = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(pg.entropy_from_logits(logits, MASK), h[MASK == 1].mean(), rtol=1e-5)


def test_adaptive_kl_update():
  np.testing.assert_allclose(pg.adaptive_kl_update(0.1, 6.0, 256, 6.0, 10000), 0.1)
  # KL/target - 1 = 1 is clipped to 0.2; 0.5 - 1 = -0.5 is clipped to -0.2.
  np.testing.assert_allclose(pg.adaptive_kl_update(0.1, 12.0, 256, 6.0, 10000),
                             0.1 * (1 + 0.2 * 256 / 10000), rtol=1e-6)
  np.testing.assert_allclose(pg.adaptive_kl_update(0.1, 3.0, 256, 6.0, 10000),
                             0.1 * (1 - 0.2 * 256 / 10000), rtol=1e-6)
  np.testing.assert_allclose(pg.adaptive_kl_update(0.1, 6.6, 100, 6.0, 1000),
                             0.1 * (1 + 0.1 * 100 / 1000), rtol=1e-6)


def test_rloo_advantages():
  scores = np.array([1., 2., 6., -1., -1., 5.], np.float32)
  adv = np.asarray(pg.rloo_advantages(scores, 3))
  # Hand: 1 - (2 + 6) / 2 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5; -1 - 2 = -3, -3, 5 - (-1) = 6.
  np.testing.assert_allclose(adv, [-3., -1.5, 4.5, -3., -3., 6.])
  np.testing.assert_allclose(adv.reshape(2, 3).sum(1), 0.0, atol=1e-6)
  adv2 = np.asarray(pg.rloo_advantages(scores, 2))
  np.testing.assert_allclose(adv2, [-1., 1., 7., -7., -6., 6.])
  with pytest.raises(ValueError, match='k=4'):
    pg.rloo_advantages(scores, 4)
  with pytest.raises(ValueError, match='k=1'):
    pg.rloo_advantages(scores, 1)


def test_grpo_advantages():
  scores = rng.normal(size=12).astype(np.float32)
  adv = np.asarray(pg.grpo_advantages(scores, 4, eps=1e-4))
  s = scores.reshape(3, 4).astype(np.float64)
  ref = (s - s.mean(1, keepdims=True)) / (s.std(1, ddof=1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(adv, ref.reshape(-1), rtol=1e-5)
  np.testing.assert_array_equal(pg.grpo_advantages(np.ones(4, np.float32), 2), 0.0)
  np.testing.assert_allclose(pg.grpo_advantages(np.array([0., 2.], np.float32), 2, eps=0.0),
                             [-1 / np.sqrt(2), 1 / np.sqrt(2)], rtol=1e-6)


def np_grpo(logp, old, ref, adv, mask, eps, beta):
  ratio = np.exp(logp.astype(np.float64) - old)
  a = adv[:, None]
  surr = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
  kl = np.exp(ref - logp) - (ref - logp) - 1
  per_tok = -(surr - beta * kl) * mask
  return np.mean(per_tok.sum(1) / mask.sum(1)), (kl * mask).sum() / mask.sum()


def test_grpo_loss():
  seq_adv = np.array([1.0, -0.5, 0.3, -2.0], np.float32)
  loss, m = pg.grpo_loss(LOGP, OLD, REF, seq_adv, MASK, clip_eps=0.2, kl_coef=0.04)
  ref_loss, ref_kl = np_grpo(LOGP, OLD, REF, seq_adv, MASK, 0.2, 0.04)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(m['kl'], ref_kl, rtol=1e-5)
  # On-policy, at the reference: each sequence contributes -A_i whatever its length.
  loss, m = pg.grpo_loss(LOGP, LOGP, LOGP, seq_adv, MASK, 0.2, 0.04)
  np.testing.assert_allclose(loss, -seq_adv.mean(), rtol=1e-6)
  assert m['kl'] == 0
  with jax.enable_x64(True):
    x = LOGP.astype(np.float64)
    f = lambda v: pg.grpo_loss(v, OLD.astype(np.float64), REF, seq_adv, MASK, 0.2, 0.04)[0]
    g = np.asarray(jax.grad(f)(x))
    np.testing.assert_allclose(g, fd_grad(f, x), rtol=1e-5, atol=1e-9)
    assert np.all(g[MASK == 0] == 0)


def test_grpo_loss_counts_empty_responses_in_the_mean():
  seq_adv = np.array([1.0, -0.5, 0.3, -2.0], np.float32)
  mask = MASK.copy()
  mask[2] = 0                                          # row 2: an empty response
  loss, _ = pg.grpo_loss(LOGP, LOGP, LOGP, seq_adv, mask, 0.2, 0.04)
  # On-policy at the reference each non-empty row gives -A_i; the empty row gives 0 and
  # still counts: the mean is over all 4 rows, not the 3 non-empty ones.
  np.testing.assert_allclose(loss, -(1.0 - 0.5 - 2.0) / 4, rtol=1e-6)


def test_sequence_sum():
  x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
  x[MASK == 0] = np.nan                                # garbage outside the mask
  np.testing.assert_allclose(pg.sequence_sum(x, MASK), np.where(MASK == 1, x, 0.0).sum(1),
                             rtol=1e-6)


def test_extreme_log_ratios_are_finite():
  big = np.where(rng.random(SHAPE) < 0.5, 50.0, -50.0).astype(np.float32)
  logp = (REF + big).astype(np.float32)
  old = (logp - big).astype(np.float32)
  fns = {
      'ppo': lambda x: pg.ppo_policy_loss(x, old, ADV, MASK, 0.2)[0],
      'grpo': lambda x: pg.grpo_loss(x, old, REF, ADV[:, 0], MASK, 0.2, 0.04)[0],
      'k3': lambda x: jnp.sum(pg.kl_penalty(x, REF, 'k3')),
  }
  for name, f in fns.items():
    loss, g = jax.value_and_grad(f)(logp)
    assert np.isfinite(loss) and np.all(np.isfinite(g)), name
