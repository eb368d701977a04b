"""The one optimizer factory: AdamW, global-norm clipping and a warm-up schedule from config."""

from typing import NamedTuple

import jax
import ml_collections
import optax


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  schedule: optax.Schedule   # step -> learning rate, logged beside the loss


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up to `opt.learning_rate`, then cosine, linear or constant decay."""
  peak, warmup = opt.learning_rate, opt.warmup_steps
  end = peak * opt.end_lr_fraction
  decay_steps = max(num_steps - warmup, 1)
  if opt.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.end_lr_fraction)
  elif opt.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif opt.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.optimizer.schedule: unknown schedule {opt.schedule!r} "
                     "(expected cosine, linear or constant)")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> Optimizer:
  """AdamW with global-norm clipping and the config's schedule over `num_steps` updates.

  Weight decay skips biases, norm scales and other vectors (rank < 2).
  """
  schedule = learning_rate_schedule(opt, num_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  chain = []
  if opt.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=decay_mask))
  return Optimizer(optax.chain(*chain), schedule)
