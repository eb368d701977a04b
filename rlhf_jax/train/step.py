"""The gradient step every stage shares: gradients (with accumulation) and one update."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax.train import optimizer as optimizer_lib
from rlhf_jax.train.state import TrainState

# loss_fn(params, extras, batch, rng) -> (scalar loss, metrics dict of scalars)
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def split_microbatches(batch: dict, num: int) -> dict:
  """[batch, ...] -> [num, batch // num, ...], micro-batch i = rows i, i + num, i + 2 num, ...

  Strided rather than contiguous so that, with the batch sharded over devices,
  every device contributes its own rows to every micro-batch and nothing moves.
  """
  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} does not split into "
                       f"config.optimizer.grad_accum_steps={num} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def gradients(loss_fn: LossFn, params, extras, batch: dict, rng: jax.Array,
              accum_steps: int = 1) -> tuple[Any, dict]:
  """Gradients and metrics of `loss_fn`, averaged over `accum_steps` micro-batches."""
  grad_fn = jax.grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    return grad_fn(params, extras, batch, rng)

  def accumulate(total, inputs):
    micro, micro_rng = inputs
    grads, metrics = grad_fn(params, extras, micro, micro_rng)
    return jax.tree.map(jnp.add, total, grads), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  rngs = jax.random.split(rng, accum_steps)
  total, metrics = jax.lax.scan(accumulate, zeros, (split_microbatches(batch, accum_steps), rngs))
  grads = jax.tree.map(lambda g: g / accum_steps, total)
  return grads, jax.tree.map(jnp.mean, metrics)


def update(loss_fn: LossFn, optimizer: optimizer_lib.Optimizer, state: TrainState, batch: dict,
           rng: jax.Array, accum_steps: int = 1) -> tuple[TrainState, dict]:
  """One optimizer update of `state` on `loss_fn` over `batch`; metrics gain grad_norm and
  learning_rate. Every stage's update goes through here (the RL stage once per minibatch)."""
  grads, metrics = gradients(loss_fn, state.params, state.extras, batch, rng, accum_steps)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                 learning_rate=optimizer.schedule(state.step))
  return state.apply_gradients(grads, optimizer.tx), metrics


def make_train_step(loss_fn: LossFn, config: ml_collections.ConfigDict):
  """(state, batch, rng) -> (state, metrics): the supervised step of SFT, reward and DPO, one
  optimizer update on `loss_fn` (with `config.optimizer.grad_accum_steps` micro-batches)."""
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.num_steps)
  accum_steps = config.optimizer.grad_accum_steps

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    return update(loss_fn, optimizer, state, batch, rng, accum_steps)

  return train_step
