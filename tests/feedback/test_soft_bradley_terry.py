"""Soft-target Bradley-Terry against a NumPy formula, and the hard loss at targets 0 and 1."""

import jax
import numpy as np

from rlhf_jax.objectives import bradley_terry

R_C = np.array([1.5, -0.3, 2.0, 0.1, -4.0], np.float32)
R_R = np.array([0.5, 0.4, -1.0, 0.1, 3.0], np.float32)
TARGET = np.array([0.9, 0.6, 1.0, 0.5, 0.2], np.float32)


def np_soft_bt(r_c, r_r, p):
  d = np.asarray(r_c, np.float64) - r_r
  log_sig = lambda x: -np.logaddexp(0.0, -x)
  return np.mean(-p * log_sig(d) - (1 - p) * log_sig(-d))


def test_soft_loss_matches_numpy():
  loss, metrics = bradley_terry.soft_bradley_terry_loss(R_C, R_R, TARGET)
  np.testing.assert_allclose(loss, np_soft_bt(R_C, R_R, TARGET.astype(np.float64)), rtol=1e-6)
  assert metrics["loss"] == loss
  np.testing.assert_allclose(metrics["accuracy"], 0.4)     # 1.5 > 0.5, 2 > -1


def test_targets_one_and_zero_are_the_hard_loss_and_its_swap():
  hard, _ = bradley_terry.bradley_terry_loss(R_C, R_R)
  soft, _ = bradley_terry.soft_bradley_terry_loss(R_C, R_R, np.ones(5, np.float32))
  np.testing.assert_allclose(soft, hard, rtol=1e-7)
  swapped, _ = bradley_terry.bradley_terry_loss(R_R, R_C)
  soft, _ = bradley_terry.soft_bradley_terry_loss(R_C, R_R, np.zeros(5, np.float32))
  np.testing.assert_allclose(soft, swapped, rtol=1e-7)


def test_gradient_is_sigmoid_minus_target():
  # d/dd [-p log s(d) - (1 - p) log s(-d)] = s(d) - p: zero where the model matches p.
  with jax.enable_x64(True):
    r_c, r_r, p = (x.astype(np.float64) for x in (R_C, R_R, TARGET))
    grad = jax.grad(lambda a: bradley_terry.soft_bradley_terry_loss(a, r_r, p)[0])(r_c)
    np.testing.assert_allclose(grad, (1 / (1 + np.exp(-(r_c - r_r))) - p) / 5, rtol=1e-10)
    keep = p < 1                                               # sigma(d) = p needs p < 1
    at_target = r_r[keep] + np.log(p[keep] / (1 - p[keep]))
    zero = jax.grad(lambda a: bradley_terry.soft_bradley_terry_loss(
        a, r_r[keep], p[keep])[0])(at_target)
    np.testing.assert_allclose(zero, 0.0, atol=1e-12)
