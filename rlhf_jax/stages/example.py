"""The smallest complete stage: linear regression, no transformer. A template for a new stage.

It implements `rlhf_jax.stages.Stage` in about forty lines: a checkpointable iterator
whose batch i is a pure function of (seed, i), a sharded init, the shared supervised
step (`train/step.make_train_step`), and an evaluation that calls the same loss.
The loop tests run it, so the template cannot drift from the contract.

  python -m experiments.train --config=configs/example.py --workdir=/tmp/example
"""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rlhf_jax.train import loop
from rlhf_jax.train import optimizer as optimizer_lib
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import step as step_lib


class CountingIterator:
  """Batch i is a pure function of (seed, i); the state is the next index."""

  def __init__(self, seed, batch_size, nan_at=None):
    self.seed, self.batch_size, self.nan_at, self.index = seed, batch_size, nan_at, 0

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.index])
    x = rng.normal(size=(self.batch_size, 4)).astype(np.float32)
    y = (x @ np.arange(8, dtype=np.float32).reshape(4, 2) / 8).astype(np.float32)
    self.index += 1
    if self.nan_at is not None and self.index == self.nan_at:
      x[0, 0] = np.nan
    return {"x": x, "y": y}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def make_data(config, workdir):
  del workdir
  nan_at = config.get("nan_at", 0) or None
  return loop.Data(train=CountingIterator(config.seed, config.data.batch_size, nan_at),
                   eval=lambda: [next(CountingIterator(123, 8))])


def init(config, rng, mesh):
  def init_fn(r):
    w = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed", "mlp"))(r, (4, 2))
    tx = optimizer_lib.make_optimizer(config.optimizer, config.train.num_steps).tx
    return state_lib.TrainState.create(params={"w": w}, tx=tx)
  state, _ = sharding_lib.init_sharded(init_fn, rng, mesh, sharding_lib.rules(config))
  return state


def loss_fn(params, extras, batch, rng):
  del extras, rng
  loss = jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
  return loss, {"loss": loss}


def make_step(config):
  return step_lib.make_train_step(loss_fn, config)


def evaluate(config, state, data, mesh, rng):
  batch = data.eval()[0]
  loss, _ = loss_fn(state.params, None, batch, rng)
  return {"loss": float(loss)}
