"""Direct preference losses: DPO and its relatives, plus KTO.

Inputs are summed sequence log-probs `[batch]` (see `sft.sequence_logprobs`):
`policy_chosen_logps` = log pi(y_w | x), `reference_chosen_logps` = log pi_ref(y_w | x), and
likewise for the rejected y_l. Each loss returns per-example losses `[batch]`;
`LOSSES` names them (the `config.preference.loss` values), and `preference_loss`
dispatches on that name and returns `(mean loss, metrics)`.
Throughout, h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l), summed over the
response tokens; only the losses that say so divide by the response length |y|.
"""

import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.objectives.sft import weighted_mean
from rlhf_jax.registry import Registry


def _float(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _log_ratio_diff(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                    reference_rejected_logps):
  return ((_float(policy_chosen_logps) - _float(reference_chosen_logps))
          - (_float(policy_rejected_logps) - _float(reference_rejected_logps)))


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, *, beta=0.1, label_smoothing=0.0):
  """DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta h), per example `[batch]`.

  With label_smoothing eps > 0 this is conservative DPO (Mitchell 2023, "A note on DPO with
  noisy preferences"): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
  """
  z = beta * _log_ratio_diff(policy_chosen_logps, policy_rejected_logps,
                             reference_chosen_logps, reference_rejected_logps)
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def robust_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                    reference_rejected_logps, *, beta=0.1, label_smoothing=0.0):
  """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", the de-biased loss).

  Unbiased for preferences flipped with known rate eps = label_smoothing < 1/2:
  [(1 - eps)(-log sigma(beta h)) - eps(-log sigma(-beta h))] / (1 - 2 eps), `[batch]`.
  """
  if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f'robust_dpo_loss: label_smoothing={label_smoothing} must be in [0, 0.5)')
  z = beta * _log_ratio_diff(policy_chosen_logps, policy_rejected_logps,
                             reference_chosen_logps, reference_rejected_logps)
  eps = label_smoothing
  return (-(1.0 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, *, beta=0.1):
  """IPO (Azar et al. 2023, eq. 17): (h - 1 / (2 tau))^2 with tau = beta, `[batch]`.

  As the paper writes it, the 1/(2 tau) target applies to h of *summed* sequence
  log-ratios, so a good tau grows with response length. TRL's "ipo" divides each
  log-ratio by its response length first: that is `ipo_length_normalised_loss`, and a
  TRL IPO beta carries over to it, not to this one.
  """
  h = _log_ratio_diff(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                      reference_rejected_logps)
  return jnp.square(h - 1.0 / (2.0 * beta))


def ipo_length_normalised_loss(policy_chosen_logps, policy_rejected_logps,
                               reference_chosen_logps, reference_rejected_logps, chosen_lengths,
                               rejected_lengths, *, beta=0.1):
  """IPO on per-token log-ratios, as TRL's `loss_type="ipo"` computes it, `[batch]`:
  (h_norm - 1 / (2 tau))^2 with h_norm = (log pi(y_w)/pi_ref(y_w)) / |y_w|
  - (log pi(y_l)/pi_ref(y_l)) / |y_l| and tau = beta; |y| = `chosen_lengths`,
  `rejected_lengths` `[batch]` response token counts.
  """
  h = (_per_token(_float(policy_chosen_logps) - _float(reference_chosen_logps), chosen_lengths)
       - _per_token(_float(policy_rejected_logps) - _float(reference_rejected_logps),
                    rejected_lengths))
  return jnp.square(h - 1.0 / (2.0 * beta))


def hinge_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
               reference_rejected_logps, *, beta=0.1):
  """SLiC-HF rank calibration (Zhao et al. 2023) on the DPO log-ratio: max(0, 1 - beta h)."""
  h = _log_ratio_diff(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                      reference_rejected_logps)
  return jax.nn.relu(1.0 - beta * h)


def _per_token(logps, lengths):
  return _float(logps) / jnp.maximum(_float(lengths), 1.0)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, *,
               beta=2.0, gamma=0.5):
  """SimPO (Meng et al. 2024, eq. 6), reference-free, `[batch]`.

  -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma), with |y| the number
  of response tokens (`chosen_lengths`, `rejected_lengths`: `[batch]`).
  """
  z = (beta * _per_token(policy_chosen_logps, chosen_lengths)
       - beta * _per_token(policy_rejected_logps, rejected_lengths) - gamma)
  return -jax.nn.log_sigmoid(z)


# Per-token log-probs are clamped below 0 so that the odds p / (1 - p) stay finite at p -> 1.
_MAX_MEAN_LOGP = -1e-6


def log1mexp(x):
  """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012) and with finite grads."""
  x = jnp.minimum(_float(x), _MAX_MEAN_LOGP)
  near_zero = x > -jnp.log(2.0)
  # Each branch gets a safe dummy input where it is not selected, so no NaN gradient leaks.
  a = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
  b = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
  return jnp.where(near_zero, a, b)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, *,
              lam=0.1):
  """ORPO (Hong et al. 2024, eqs. 6-7): L_SFT + lam * L_OR, reference-free, `[batch]`.

  P(y|x) is the length-normalised likelihood exp(log pi(y|x) / |y|);
  log odds(y) = log P - log(1 - P); L_OR = -log sigma(log odds(y_w) - log odds(y_l));
  L_SFT = -log pi(y_w|x) / |y_w|.
  """
  logp_w = jnp.minimum(_per_token(policy_chosen_logps, chosen_lengths), _MAX_MEAN_LOGP)
  logp_l = jnp.minimum(_per_token(policy_rejected_logps, rejected_lengths), _MAX_MEAN_LOGP)
  log_odds = (logp_w - log1mexp(logp_w)) - (logp_l - log1mexp(logp_l))
  return -logp_w - lam * jax.nn.log_sigmoid(log_odds)


def kto_loss(policy_logps, reference_logps, desirable, kl_reference_point, *, beta=0.1,
             desirable_weight=1.0, undesirable_weight=1.0):
  """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired examples, `[batch]`.

  r = log pi(y|x) / pi_ref(y|x); z0 = `kl_reference_point` (treated as a constant);
  v = lambda_D sigma(beta (r - z0)) if desirable else lambda_U sigma(beta (z0 - r));
  loss = lambda_y - v.

  Args:
    policy_logps, reference_logps: `[batch]` summed log-probs.
    desirable: `[batch]` bool, True for a desirable (thumbs-up) y.
    kl_reference_point: scalar z0 >= 0, e.g. from `kto_reference_point`.
  """
  r = _float(policy_logps) - _float(reference_logps)
  z0 = jax.lax.stop_gradient(_float(kl_reference_point))
  desirable = jnp.asarray(desirable, bool)
  weight = jnp.where(desirable, desirable_weight, undesirable_weight)
  v = weight * jax.nn.sigmoid(jnp.where(desirable, beta * (r - z0), beta * (z0 - r)))
  return weight - v


def kto_reference_point(policy_logps, reference_logps, weights=None):
  """KTO's z0 (Ethayarajh et al. 2024, Sec. 4.1): max(0, mean log pi/pi_ref), no gradient.

  Pass log-probs of mismatched pairs (x_i, y_j), j != i, e.g. the batch's responses shifted
  by one, as a biased estimate of KL(pi || pi_ref). `weights` `[batch]`: a weighted mean
  (0 drops a row). Returns a scalar.
  """
  kl = weighted_mean(_float(policy_logps) - _float(reference_logps), weights)
  return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))



class PreferenceLoss(NamedTuple):
  """A registered loss, read off its function's signature: `inputs` are its positional
  arguments (which log-probs and lengths it takes), `hparams` its keyword-only ones (the
  `config.preference` fields of the same names)."""
  losses: Callable       # per-example losses [batch]
  inputs: tuple[str, ...]
  hparams: tuple[str, ...]
  defaults: dict         # hparam -> the function's default
  unpaired: bool         # KTO: the pairs taken apart, chosen desirable, rejected undesirable

  @property
  def reference_free(self) -> bool:
    return REFERENCE_INPUTS[0] not in self.inputs and not self.unpaired


REFERENCE_INPUTS = ('reference_chosen_logps', 'reference_rejected_logps')
LOSSES: Registry[PreferenceLoss] = Registry("preference loss", "config.preference.loss")


def register(name: str, losses: Callable, unpaired: bool = False) -> PreferenceLoss:
  """Adds a loss under `name`; its inputs and hyper-parameters come from its signature."""
  params = inspect.signature(losses).parameters.values()
  return LOSSES.register(name, PreferenceLoss(
      losses, inputs=tuple(p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD),
      hparams=tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY),
      defaults={p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY},
      unpaired=unpaired))


register('sigmoid', dpo_loss)
register('robust', robust_dpo_loss)
register('ipo', ipo_loss)
register('ipo_length_normalised', ipo_length_normalised_loss)
register('hinge', hinge_loss)
register('simpo', simpo_loss)
register('orpo', orpo_loss)
register('kto', kto_loss, unpaired=True)


def implicit_rewards(kind, policy_chosen_logps, policy_rejected_logps,
                     reference_chosen_logps=None, reference_rejected_logps=None, *,
                     chosen_lengths=None, rejected_lengths=None, **hparams):
  """(chosen, rejected) `[batch]` implicit rewards in the convention of loss `kind`:
  beta (log pi(y|x) - log pi_ref(y|x)) (DPO, eq. 5; summed log-probs for every loss with a
  reference), or beta log pi(y|x) / |y| for the reference-free 'simpo' and 'orpo' (SimPO
  eq. 4). beta is `hparams['beta']`, else the loss's default, else 1 (ORPO)."""
  record = LOSSES.get(kind)
  beta = hparams.get('beta', record.defaults.get('beta', 1.0))
  pc, pr = _float(policy_chosen_logps), _float(policy_rejected_logps)
  if record.reference_free:
    return beta * _per_token(pc, chosen_lengths), beta * _per_token(pr, rejected_lengths)
  rc, rr = _float(reference_chosen_logps), _float(reference_rejected_logps)
  return beta * (pc - rc), beta * (pr - rr)


def preference_loss(kind, policy_chosen_logps, policy_rejected_logps,
                    reference_chosen_logps=None, reference_rejected_logps=None, *,
                    chosen_lengths=None, rejected_lengths=None, weights=None, field=None,
                    **hparams):
  """Mean preference loss of `kind` (a name in `LOSSES`), and metrics.

  Args:
    kind: 'sigmoid' (DPO / cDPO), 'robust', 'ipo', 'ipo_length_normalised', 'hinge',
      'simpo', 'orpo' or 'kto' (each pair taken apart: y_w desirable, y_l undesirable, with
      z0 from the batch's own log-ratios, a cheaper and more conservative estimate than
      the paper's mismatched pairs).
    policy_chosen_logps, policy_rejected_logps: `[batch]` summed log-probs under pi.
    reference_chosen_logps, reference_rejected_logps: `[batch]` under pi_ref; unused (may be
      None) for the reference-free 'simpo' and 'orpo'.
    chosen_lengths, rejected_lengths: `[batch]` response token counts, for the losses that
      take them ('simpo', 'orpo', 'ipo_length_normalised').
    weights: optional `[batch]` example weights (e.g. 0 for a pair whose two responses
      tie, or a padding row of an eval batch); loss and metrics are weighted means over
      them. None: plain means.
    field: the config field that named `kind`, for the error of an unknown name.
    **hparams: keyword hyper-parameters of the loss (`LOSSES.get(kind).hparams`).

  Returns:
    `(loss, metrics)`. Implicit rewards are beta (log pi - log pi_ref) (DPO, eq. 5), or for
    the reference-free kinds beta log pi / |y| (SimPO eq. 4; ORPO uses beta = 1). Metrics:
    loss, rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy, logps/chosen,
    logps/rejected (batch means), and kto/z0 for 'kto'.
  """
  record = LOSSES.get(kind, field)
  unknown = sorted(set(hparams) - set(record.hparams))
  if unknown:
    raise ValueError(f'preference_loss(kind={kind!r}): unexpected hyper-parameter(s) {unknown}; '
                     f'accepts {list(record.hparams)}')
  pc, pr = _float(policy_chosen_logps), _float(policy_rejected_logps)
  given = dict(policy_chosen_logps=pc, policy_rejected_logps=pr,
               reference_chosen_logps=reference_chosen_logps,
               reference_rejected_logps=reference_rejected_logps,
               chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
  missing = [n for n in (REFERENCE_INPUTS if record.unpaired else record.inputs)
             if given[n] is None]
  if missing:
    raise ValueError(f'preference_loss(kind={kind!r}) needs {" and ".join(missing)}')

  mean = lambda x: weighted_mean(x, weights)
  extra = {}
  if record.unpaired:
    policy = jnp.concatenate([pc, pr])
    reference = jnp.concatenate([reference_chosen_logps, reference_rejected_logps])
    desirable = jnp.arange(policy.shape[0]) < pc.shape[0]
    both = None if weights is None else jnp.concatenate([weights, weights])
    z0 = kto_reference_point(policy, reference, both)
    loss = weighted_mean(record.losses(policy, reference, desirable, z0, **hparams), both)
    extra = {'kto/z0': z0}
  else:
    if not record.reference_free:
      given.update({n: _float(given[n]) for n in REFERENCE_INPUTS})
    losses = record.losses(*(given[n] for n in record.inputs), **hparams)
    if losses.ndim != 1:
      raise ValueError(f'preference_loss: log-probs must be [batch], got shape {pc.shape}')
    loss = mean(losses)
  reward_c, reward_r = implicit_rewards(kind, pc, pr, reference_chosen_logps,
                                        reference_rejected_logps, chosen_lengths=chosen_lengths,
                                        rejected_lengths=rejected_lengths, **hparams)
  metrics = {
      'loss': loss,
      **extra,
      'rewards/chosen': mean(reward_c),
      'rewards/rejected': mean(reward_r),
      'rewards/margin': mean(reward_c - reward_r),
      'rewards/accuracy': mean((reward_c > reward_r).astype(jnp.float32)),
      'logps/chosen': mean(pc),
      'logps/rejected': mean(pr),
  }
  return loss, metrics
