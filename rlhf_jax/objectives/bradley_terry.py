"""Bradley-Terry pairwise loss for reward models."""

import jax
import jax.numpy as jnp

from rlhf_jax.objectives.sft import weighted_mean


def _float(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def bradley_terry_loss(r_chosen, r_rejected, *, margin=None, label_smoothing=0.0,
                       center_coef=0.0, weights=None):
  """Reward-model loss -log sigma(r_c - r_r - m), averaged over pairs.

  * InstructGPT (Ouyang et al. 2022, eq. 1): -log sigma(r(x, y_w) - r(x, y_l)).
  * Llama 2 (Touvron et al. 2023, eq. 2): a per-pair margin m subtracted inside sigma.
  * Label smoothing eps (a preference flipped with probability eps):
    -(1 - eps) log sigma(d) - eps log sigma(-d), d = r_c - r_r - m.
  * Centring (Eisenstein et al. 2023, "Helping or Herding?"): + center_coef * (r_c + r_r)^2,
    which pins the otherwise free offset of the reward near 0.

  Args:
    r_chosen: `[batch]` rewards of the preferred responses.
    r_rejected: `[batch]` rewards of the rejected responses.
    margin: optional `[batch]` margins m.
    label_smoothing: eps in [0, 1].
    center_coef: weight of the centring penalty.
    weights: optional `[batch]` pair weights (an eval batch's `valid`: 0 drops a padding
      row); every mean is then weighted. None: plain means.

  Returns:
    `(loss, metrics)`: scalar loss; metrics `loss`, `accuracy` (fraction r_c > r_r),
    `reward_chosen`, `reward_rejected`, `margin` (mean r_c - r_r).
  """
  r_c, r_r = _float(r_chosen), _float(r_rejected)
  if r_c.ndim != 1 or r_c.shape != r_r.shape:
    raise ValueError(f'bradley_terry_loss: r_chosen {r_c.shape} and r_rejected {r_r.shape} '
                     'must both be [batch]')
  d = r_c - r_r
  if margin is not None:
    d = d - _float(margin)
  eps = label_smoothing
  per_pair = -(1.0 - eps) * jax.nn.log_sigmoid(d) - eps * jax.nn.log_sigmoid(-d)
  mean = lambda x: weighted_mean(x, weights)
  loss = mean(per_pair) + center_coef * mean(jnp.square(r_c + r_r))
  metrics = {
      'loss': loss,
      'accuracy': mean((r_c > r_r).astype(jnp.float32)),
      'reward_chosen': mean(r_c),
      'reward_rejected': mean(r_r),
      'margin': mean(r_c - r_r),
  }
  return loss, metrics


def soft_bradley_terry_loss(r_chosen, r_rejected, target, **kwargs):
  """Bradley-Terry with soft targets: -[p log sigma(d) + (1 - p) log sigma(-d)], d = r_c - r_r.

  p = target `[batch]` in [0, 1], the labeller's P(chosen > rejected): the cross-entropy
  between the labeller's preference distribution and the reward model's (RLAIF, Lee et al.
  2023, Sec. 2.2). It is `bradley_terry_loss` with a per-pair label smoothing 1 - p, so
  p = 1 is the hard loss and p = 0 the hard loss with the pair swapped. An AI-labelled
  dataset (`rlhf_jax.feedback.judge`) keeps the judge's log-odds as `margin`: p =
  sigmoid(margin). Other keyword arguments (margin, center_coef, ...) go to
  `bradley_terry_loss`; returns its `(loss, metrics)`.
  """
  return bradley_terry_loss(r_chosen, r_rejected, label_smoothing=1.0 - _float(target),
                            **kwargs)
