"""Tests for rlhf_jax.objectives.bradley_terry against NumPy formulas."""

import jax
import numpy as np
import pytest

from rlhf_jax.objectives import bradley_terry


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_bt(r_c, r_r, margin=0.0, eps=0.0, center=0.0):
  d = r_c - r_r - margin
  per = -(1 - eps) * np_log_sigmoid(d) - eps * np_log_sigmoid(-d)
  return per.mean() + center * ((r_c + r_r) ** 2).mean()


R_C = np.array([1.5, -0.3, 2.0, 0.1], np.float32)
R_R = np.array([0.5, 0.4, -1.0, 0.1], np.float32)
MARGIN = np.array([0.0, 1.0, 0.5, 2.0], np.float32)


def test_equal_rewards_give_log2():
  loss, metrics = bradley_terry.bradley_terry_loss(np.zeros(3), np.zeros(3))
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  assert metrics['accuracy'] == 0.0  # ties are not counted as correct


@pytest.mark.parametrize('margin,eps,center', [(None, 0.0, 0.0), (MARGIN, 0.0, 0.0),
                                               (None, 0.1, 0.0), (MARGIN, 0.2, 0.01)])
def test_matches_numpy(margin, eps, center):
  loss, metrics = bradley_terry.bradley_terry_loss(R_C, R_R, margin=margin, label_smoothing=eps,
                                                   center_coef=center)
  ref = np_bt(R_C.astype(np.float64), R_R, 0.0 if margin is None else margin, eps, center)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  assert metrics['loss'] == loss
  np.testing.assert_allclose(metrics['accuracy'], 0.5)  # 1.5>0.5, 2>-1; -0.3<0.4, tie
  np.testing.assert_allclose(metrics['reward_chosen'], R_C.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['reward_rejected'], R_R.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['margin'], (R_C - R_R).mean(), rtol=1e-6)


def test_gradient_matches_closed_form_and_finite_differences():
  with jax.enable_x64(True):
    r_c, r_r, m = R_C.astype(np.float64), R_R.astype(np.float64), MARGIN.astype(np.float64)
    f = lambda a, b: bradley_terry.bradley_terry_loss(a, b, margin=m, label_smoothing=0.1,
                                                      center_coef=0.05)[0]
    g_c, g_r = jax.grad(f, argnums=(0, 1))(r_c, r_r)
    d = r_c - r_r - m
    sig = 1 / (1 + np.exp(-d))
    # d/dd [-(1-eps) log s(d) - eps log s(-d)] = -(1-eps)(1-s) + eps s = s - (1-eps).
    closed = (sig - 0.9) / 4
    center = 2 * 0.05 * (r_c + r_r) / 4
    np.testing.assert_allclose(g_c, closed + center, rtol=1e-10)
    np.testing.assert_allclose(g_r, -closed + center, rtol=1e-10)
    h = 1e-6
    e0 = np.eye(4)[0] * h
    np.testing.assert_allclose(g_c[0], (f(r_c + e0, r_r) - f(r_c - e0, r_r)) / (2 * h), rtol=1e-6)


def test_extreme_rewards_are_finite():
  r_c = np.array([50., -50., 1e4], np.float32)
  r_r = np.array([-50., 50., -1e4], np.float32)
  f = lambda a, b: bradley_terry.bradley_terry_loss(a, b, label_smoothing=0.1)[0]
  loss = f(r_c, r_r)
  grads = jax.grad(f, argnums=(0, 1))(r_c, r_r)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_allclose(loss, np_bt(r_c.astype(np.float64), r_r, eps=0.1), rtol=1e-5)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match='r_chosen'):
    bradley_terry.bradley_terry_loss(np.zeros(3), np.zeros(4))
