"""The immutable train state and the optimizer built from the config."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a run carries from step to step; checkpointed as one pytree.

  `params` are trained; `extras` are frozen pytrees and scalars a stage needs in
  its step (a reference policy, a reward model, an adaptive KL coefficient) and
  are never touched by the optimizer. The optimizer itself is not state: it is a
  pure function of the config (`train/optimizer.make_optimizer`), built where it is used.
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
