"""Tests for rlhf_jax.objectives.preference against NumPy formulas and finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.objectives import preference
from tests.numerics import fd_grad


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def np_losses(kind, pc, pr, rc, rr, lc, lr, beta=0.1, label_smoothing=0.0, gamma=0.5, lam=0.1):
  """Independent float64 formulas, straight from the papers."""
  h = (pc - rc) - (pr - rr)
  eps = label_smoothing
  if kind == 'sigmoid':
    return -(1 - eps) * np_log_sigmoid(beta * h) - eps * np_log_sigmoid(-beta * h)
  if kind == 'robust':
    return ((1 - eps) * -np_log_sigmoid(beta * h) - eps * -np_log_sigmoid(-beta * h)) / (1 - 2 * eps)
  if kind == 'ipo':
    return (h - 1 / (2 * beta)) ** 2
  if kind == 'ipo_length_normalised':   # TRL: each log-ratio divided by its length first
    return ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
  if kind == 'hinge':
    return np.maximum(0.0, 1 - beta * h)
  if kind == 'simpo':
    return -np_log_sigmoid(beta * pc / lc - beta * pr / lr - gamma)
  if kind == 'orpo':
    mw, ml = pc / lc, pr / lr
    log_odds = lambda m: m - np.log(-np.expm1(m))
    return -mw - lam * np_log_sigmoid(log_odds(mw) - log_odds(ml))
  raise AssertionError(kind)


rng = np.random.default_rng(0)
B = 6
LENS_C = np.array([3, 10, 1, 7, 4, 20], np.int32)
LENS_R = np.array([5, 2, 8, 7, 1, 15], np.int32)
PC = (-rng.uniform(0.2, 3.0, B) * LENS_C).astype(np.float32)
PR = (-rng.uniform(0.2, 3.0, B) * LENS_R).astype(np.float32)
RC = (PC + rng.normal(size=B)).astype(np.float32)
RR = (PR + rng.normal(size=B)).astype(np.float32)
HPARAMS = {
    'sigmoid': dict(beta=0.3, label_smoothing=0.1),
    'robust': dict(beta=0.3, label_smoothing=0.2),
    'ipo': dict(beta=0.5),
    'ipo_length_normalised': dict(beta=0.5),
    'hinge': dict(beta=0.7),
    'simpo': dict(beta=2.0, gamma=0.8),
    'orpo': dict(lam=0.25),
}


PAIRED = [k for k in preference.LOSSES.names() if not preference.LOSSES.get(k).unpaired]
REFERENCE_FREE = [k for k in PAIRED if preference.LOSSES.get(k).reference_free]


def call(kind, pc, pr, rc, rr, lc=LENS_C, lr=LENS_R, **hp):
  """The registered per-example loss of `kind` on its own inputs, by name."""
  record = preference.LOSSES.get(kind)
  given = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
               reference_rejected_logps=rr, chosen_lengths=lc, rejected_lengths=lr)
  return record.losses(*(given[n] for n in record.inputs), **hp)


def test_registry_is_the_one_source_of_names_inputs_and_hyper_parameters():
  assert set(PAIRED) == set(HPARAMS) and REFERENCE_FREE == ['orpo', 'simpo']
  assert preference.LOSSES.get('sigmoid').hparams == ('beta', 'label_smoothing')
  assert preference.LOSSES.get('kto').hparams == ('beta', 'desirable_weight',
                                                  'undesirable_weight')
  assert preference.LOSSES.get('ipo_length_normalised').inputs[4:] == ('chosen_lengths',
                                                                      'rejected_lengths')
  with pytest.raises(ValueError, match=r"config.preference.loss: unknown preference loss 'dpo'; "
                                       r"known: hinge, ipo, ipo_length_normalised, kto"):
    preference.LOSSES.get('dpo')
  with pytest.raises(ValueError, match=r"^config.rl.dpo_loss: unknown"):
    preference.preference_loss('dpo', PC, PR, RC, RR, field='config.rl.dpo_loss')


def test_length_normalised_ipo_equals_ipo_on_per_token_log_probs():
  # TRL's IPO: the log-probs of policy and reference divided by the response length.
  per_token = lambda x, n: (x / n).astype(np.float32)
  np.testing.assert_allclose(
      preference.ipo_length_normalised_loss(PC, PR, RC, RR, LENS_C, LENS_R, beta=0.5),
      preference.ipo_loss(per_token(PC, LENS_C), per_token(PR, LENS_R), per_token(RC, LENS_C),
                          per_token(RR, LENS_R), beta=0.5), rtol=1e-5)
  # and differs from the summed convention once lengths differ.
  assert np.max(np.abs(preference.ipo_length_normalised_loss(PC, PR, RC, RR, LENS_C, LENS_R)
                       - preference.ipo_loss(PC, PR, RC, RR))) > 1.0


@pytest.mark.parametrize('kind', PAIRED)
def test_losses_match_numpy(kind):
  out = call(kind, PC, PR, RC, RR, **HPARAMS[kind])
  assert out.shape == (B,) and out.dtype == jnp.float32
  f64 = lambda a: a.astype(np.float64)
  ref = np_losses(kind, f64(PC), f64(PR), f64(RC), f64(RR), LENS_C, LENS_R, **HPARAMS[kind])
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6)


def test_hand_values_at_zero_log_ratio():
  z = np.zeros(2, np.float32)
  np.testing.assert_allclose(preference.dpo_loss(z, z, z, z, beta=0.1), np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(preference.robust_dpo_loss(z, z, z, z, beta=0.1, label_smoothing=0.3),
                             np.log(2.0), rtol=1e-6)  # (0.7 - 0.3) log 2 / 0.4
  np.testing.assert_allclose(preference.ipo_loss(z, z, z, z, beta=0.5), 1.0, rtol=1e-6)
  np.testing.assert_allclose(preference.hinge_loss(z, z, z, z, beta=0.5), 1.0, rtol=1e-6)
  # ORPO with both mean log-probs = log 0.5: odds 1, L_OR = log 2, L_SFT = log 2.
  half = np.full(2, np.log(0.5) * 4, np.float32)
  np.testing.assert_allclose(preference.orpo_loss(half, half, [4, 4], [4, 4], lam=0.5),
                             1.5 * np.log(2.0), rtol=1e-6)
  # SimPO with equal per-token log-probs: -log sigma(-gamma).
  np.testing.assert_allclose(preference.simpo_loss(half, half / 2, [4, 4], [2, 2], beta=2.0,
                                                   gamma=1.0), np.log1p(np.e), rtol=1e-6)


def test_label_smoothing_zero_is_plain_dpo():
  ref = preference.dpo_loss(PC, PR, RC, RR, beta=0.3)
  np.testing.assert_allclose(preference.robust_dpo_loss(PC, PR, RC, RR, beta=0.3), ref, rtol=1e-6)
  np.testing.assert_allclose(preference.dpo_loss(PC, PR, RC, RR, beta=0.3, label_smoothing=0.0),
                             ref, rtol=1e-6)


def test_robust_dpo_is_unbiased_under_label_flips():
  # Chowdhury et al.: E over flips with rate eps of the robust loss equals the clean DPO loss.
  eps = 0.2
  kw = dict(beta=0.3, label_smoothing=eps)
  flipped_mix = ((1 - eps) * preference.robust_dpo_loss(PC, PR, RC, RR, **kw)
                 + eps * preference.robust_dpo_loss(PR, PC, RR, RC, **kw))
  np.testing.assert_allclose(flipped_mix, preference.dpo_loss(PC, PR, RC, RR, beta=0.3),
                             rtol=1e-5)


def test_dpo_small_beta_limit():
  # Rafailov et al. Sec. 4 gradient: -beta sigma(-beta h) (grad log pi(y_w) - grad log pi(y_l)),
  # so as beta -> 0 the loss -> log 2 and dL/dlog pi(y_w) -> -beta / 2.
  beta = 1e-4
  loss, metrics = preference.preference_loss('sigmoid', PC, PR, RC, RR, beta=beta)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-4)
  g_c, g_r = jax.grad(lambda a, b: preference.preference_loss('sigmoid', a, b, RC, RR,
                                                              beta=beta)[0], argnums=(0, 1))(PC, PR)
  np.testing.assert_allclose(g_c / beta, -0.5 / B, rtol=1e-3)
  np.testing.assert_allclose(g_r / beta, 0.5 / B, rtol=1e-3)
  # At finite beta the weight is exactly sigma(-beta h) (the paper's "implicit reward error").
  beta = 0.3
  g_c = jax.grad(lambda a: jnp.sum(preference.dpo_loss(a, PR, RC, RR, beta=beta)))(PC)
  h = (PC.astype(np.float64) - RC) - (PR - RR)
  np.testing.assert_allclose(g_c, -beta / (1 + np.exp(beta * h)), rtol=1e-5)


@pytest.mark.parametrize('kind', PAIRED)
def test_gradients_match_finite_differences(kind):
  with jax.enable_x64(True):
    args = [a.astype(np.float64) for a in (PC, PR, RC, RR)]
    for i in range(2 if kind in REFERENCE_FREE else 4):
      def f(x):
        a = list(args)
        a[i] = x
        return jnp.sum(call(kind, *a, **HPARAMS[kind]))
      np.testing.assert_allclose(jax.grad(f)(args[i]), fd_grad(f, args[i]), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize('kind', PAIRED)
def test_extreme_log_ratios_are_finite(kind):
  # Log-ratios of +-50 (reference-based) and mean log-probs from -50 to 0 (reference-free).
  pc = np.array([-1., -100., -50., 0., -1e-9], np.float32)
  pr = np.array([-101., -1., 0., -50., -1e-9], np.float32)
  rc = pc + np.array([-50., 50., 50., -50., 0.], np.float32)
  rr = pr + np.array([50., -50., -50., 50., 0.], np.float32)
  lens = np.ones(5, np.int32)
  hp = dict(HPARAMS[kind], **({} if kind in REFERENCE_FREE else {'beta': 1.0}))
  f = lambda a, b, c, d: jnp.sum(call(kind, a, b, c, d, lens, lens, **hp))
  loss = f(pc, pr, rc, rr)
  grads = jax.grad(f, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
  assert np.isfinite(loss), loss
  assert all(np.all(np.isfinite(g)) for g in grads), grads


def test_log1mexp_matches_numpy_and_has_finite_grads():
  x = np.array([-50., -5., -np.log(2), -0.5, -1e-3, -1e-5], np.float32)
  np.testing.assert_allclose(preference.log1mexp(x), np.log(-np.expm1(x.astype(np.float64))),
                             rtol=1e-5, atol=1e-20)
  g = jax.grad(lambda v: jnp.sum(preference.log1mexp(v)))(np.array([-50., -0.1, 0.], np.float32))
  assert np.all(np.isfinite(g))


def test_kto_matches_numpy_and_hand_value():
  pol = np.array([-3., -5., -2., -8.], np.float32)
  ref = np.array([-4., -4., -2., -7.], np.float32)
  desirable = np.array([True, True, False, False])
  z0, beta, wd, wu = 0.3, 0.5, 1.0, 1.5
  out = preference.kto_loss(pol, ref, desirable, z0, beta=beta, desirable_weight=wd,
                            undesirable_weight=wu)
  r = pol.astype(np.float64) - ref
  sig = lambda x: 1 / (1 + np.exp(-x))
  lam = np.where(desirable, wd, wu)
  v = np.where(desirable, wd * sig(beta * (r - z0)), wu * sig(beta * (z0 - r)))
  np.testing.assert_allclose(out, lam - v, rtol=1e-6)
  # r == z0 -> v = lambda / 2.
  np.testing.assert_allclose(preference.kto_loss([1.], [0.], [False], 1.0, undesirable_weight=2.),
                             [1.0], rtol=1e-6)


def test_kto_reference_point_and_gradients():
  pol = np.array([-3., -5., -1.], np.float32)
  ref = np.array([-4., -4., -4.], np.float32)
  np.testing.assert_allclose(preference.kto_reference_point(pol, ref), 1.0, rtol=1e-6)
  assert preference.kto_reference_point(ref, pol) == 0.0  # clamped at 0
  g = jax.grad(lambda p: preference.kto_reference_point(p, ref))(pol)
  assert np.all(g == 0)

  def f(p):
    z0 = preference.kto_reference_point(p, ref)  # the paper's z0 is a constant
    return jnp.sum(preference.kto_loss(p, ref, [True, False, True], z0, beta=0.1))
  # Even a z0 passed with a gradient path is treated as a constant.
  g_z0 = jax.grad(lambda z: jnp.sum(preference.kto_loss(pol, ref, [True, False, True], z)))(1.0)
  assert g_z0 == 0
  sig = lambda x: 1 / (1 + np.exp(-x))
  r, b = pol.astype(np.float64) - ref, 0.1
  s = np.where([True, False, True], sig(b * (r - 1.0)), sig(b * (1.0 - r)))
  expected = np.where([True, False, True], -b * s * (1 - s), b * s * (1 - s))
  np.testing.assert_allclose(jax.grad(f)(pol), expected, rtol=1e-5)
  extreme = jax.grad(lambda p: jnp.sum(preference.kto_loss(p, ref, [True, False, True], 0.0)))(
      ref + np.array([50., -50., -50.], np.float32))
  assert np.all(np.isfinite(extreme))


def test_dispatcher_metrics():
  beta = 0.3
  loss, m = preference.preference_loss('sigmoid', PC, PR, RC, RR, beta=beta, label_smoothing=0.1)
  np.testing.assert_allclose(loss, np.mean(preference.dpo_loss(PC, PR, RC, RR, beta=beta,
                                                               label_smoothing=0.1)), rtol=1e-6)
  rew_c, rew_r = beta * (PC - RC), beta * (PR - RR)
  np.testing.assert_allclose(m['rewards/chosen'], rew_c.mean(), rtol=1e-5)
  np.testing.assert_allclose(m['rewards/rejected'], rew_r.mean(), rtol=1e-5)
  np.testing.assert_allclose(m['rewards/margin'], (rew_c - rew_r).mean(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m['rewards/accuracy'], np.mean(rew_c > rew_r))
  np.testing.assert_allclose(m['logps/chosen'], PC.mean(), rtol=1e-6)
  np.testing.assert_allclose(m['logps/rejected'], PR.mean(), rtol=1e-6)
  # Reference-free: rewards are beta * per-token log-prob.
  _, m = preference.preference_loss('simpo', PC, PR, chosen_lengths=LENS_C,
                                    rejected_lengths=LENS_R, beta=2.0)
  np.testing.assert_allclose(m['rewards/chosen'], np.mean(2.0 * PC / LENS_C), rtol=1e-5)


def test_dispatcher_weights_drop_rows():
  keep = np.arange(len(PC)) % 2 == 0
  weights = keep.astype(np.float32)
  loss, m = preference.preference_loss('sigmoid', PC, PR, RC, RR, beta=0.3, weights=weights)
  expected, em = preference.preference_loss('sigmoid', PC[keep], PR[keep], RC[keep], RR[keep],
                                            beta=0.3)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  for k in em:
    np.testing.assert_allclose(m[k], em[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_dispatcher_jits_with_static_kind():
  f = jax.jit(functools.partial(preference.preference_loss, 'ipo', beta=0.5))
  np.testing.assert_allclose(f(PC, PR, RC, RR)[0], np.mean(preference.ipo_loss(PC, PR, RC, RR,
                                                                               beta=0.5)), rtol=1e-6)


def test_dispatcher_errors():
  with pytest.raises(ValueError, match="'dpo_typo'"):
    preference.preference_loss('dpo_typo', PC, PR, RC, RR)
  with pytest.raises(ValueError, match="'gamma'"):
    preference.preference_loss('ipo', PC, PR, RC, RR, gamma=1.0)
  with pytest.raises(ValueError, match='chosen_lengths'):
    preference.preference_loss('orpo', PC, PR)
  with pytest.raises(ValueError, match='reference_chosen_logps'):
    preference.preference_loss('sigmoid', PC, PR)
  with pytest.raises(ValueError, match='label_smoothing'):
    preference.preference_loss('robust', PC, PR, RC, RR, label_smoothing=0.5)


def test_dispatcher_kto_takes_the_pairs_apart_and_weights_drop_rows():
  hp = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
  loss, m = preference.preference_loss('kto', PC, PR, RC, RR, **hp)
  policy, reference = np.concatenate([PC, PR]), np.concatenate([RC, RR])
  z0 = max(0.0, np.mean(policy.astype(np.float64) - reference))
  desirable = np.arange(2 * B) < B
  expected = preference.kto_loss(policy, reference, desirable, z0, **hp)
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  np.testing.assert_allclose(m['kto/z0'], z0, rtol=1e-5)
  np.testing.assert_allclose(m['rewards/chosen'], np.mean(0.5 * (PC - RC)), rtol=1e-5)
  keep = np.arange(B) < 4
  weighted, wm = preference.preference_loss('kto', PC, PR, RC, RR, weights=keep, **hp)
  dropped, dm = preference.preference_loss('kto', PC[keep], PR[keep], RC[keep], RR[keep], **hp)
  np.testing.assert_allclose(weighted, dropped, rtol=1e-5)
  np.testing.assert_allclose(wm['kto/z0'], dm['kto/z0'], rtol=1e-5, atol=1e-7)
  assert abs(float(weighted) - float(loss)) > 1e-4
