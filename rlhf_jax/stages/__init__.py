"""The stages, each a module implementing `Stage`, looked up by `config.stage`."""

import importlib
from typing import Any, Callable, Protocol

import jax
import ml_collections

from rlhf_jax.train import loop
from rlhf_jax.train import state as state_lib

NAMES = ("pretrain", "sft", "reward", "dpo", "ppo", "example")

# (state, device batch, rng) -> (state, metrics of scalars); pure, jitted once by the loop
# with the state donated.
StepFn = Callable[[state_lib.TrainState, dict, jax.Array], tuple[state_lib.TrainState, dict]]


class Stage(Protocol):
  """What `train/loop.train` calls; a stage module provides these four functions.

  `rlhf_jax/stages/example.py` is the smallest complete implementation.
  """

  def make_data(self, config: ml_collections.ConfigDict, workdir: str) -> loop.Data:
    """The train iterator (checkpointable: get_state/set_state) and eval batches."""

  def init(self, config: ml_collections.ConfigDict, rng: jax.Array,
           mesh: jax.sharding.Mesh) -> state_lib.TrainState:
    """The initial TrainState, sharded on `mesh` (params from `config.init` if set)."""

  def make_step(self, config: ml_collections.ConfigDict) -> StepFn:
    """The pure train step."""

  def evaluate(self, config: ml_collections.ConfigDict, state: state_lib.TrainState,
               data: loop.Data, mesh: jax.sharding.Mesh, rng: jax.Array) -> dict[str, Any]:
    """Held-out metrics; scalars are logged, other values (sample texts) kept in metrics.jsonl."""


def load(name: str) -> Stage:
  """The stage module `rlhf_jax.stages.<name>`; a clear error for an unknown name."""
  if name not in NAMES:
    raise ValueError(f"config.stage: unknown stage {name!r}; expected one of {NAMES}")
  return importlib.import_module(f"rlhf_jax.stages.{name}")
