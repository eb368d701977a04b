"""The immutable train state and the optimizer built from the config."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a run carries from step to step; checkpointed as one pytree.

  `params` are trained; `extras` are frozen pytrees and scalars a stage needs in
  its step (a reference policy, a reward model, an adaptive KL coefficient) and
  are never touched by the optimizer. The optimizer itself is not state: it is a
  pure function of the config (`make_optimizer`), built where it is used.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  extras: Any

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, extras=None):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               extras=extras if extras is not None else {})

  def apply_gradients(self, grads, tx: optax.GradientTransformation):
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


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


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping and the config's schedule.

  Weight decay skips biases, norm scales and other vectors (rank < 2).
  """
  schedule = learning_rate_schedule(opt, num_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  chain = []
  if opt.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay, mask=decay_mask))
  return optax.chain(*chain)
