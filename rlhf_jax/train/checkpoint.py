"""Orbax checkpoints: the train state and the data iterator's position, together.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest one.
"""

import os
from typing import Any

import jax
from flax import traverse_util
import orbax.checkpoint as ocp

from rlhf_jax.train import distributed
from rlhf_jax.train import sharding as sharding_lib


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read back; the message names it."""


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  """The run's checkpoints under workdir/checkpoints; the latest `keep` are kept (0: all)."""
  if keep < 0:
    raise ValueError(f"config.train.keep_checkpoints={keep}: expected >= 0 (0: keep all)")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: Any) -> None:
  """Saves the state pytree and the (JSON-serialisable) data iterator state.

  Collective: every process calls it. Each process reads its own data shard, so
  multi-process the data item holds every process's iterator state.
  """
  if jax.process_count() > 1:
    data_state = {"process_states": distributed.allgather_json(data_state)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, like_state: Any):
  """Restores (state, data_state) at `step` onto the shardings of `like_state`.

  The target shardings come from `like_state`, so a checkpoint written on one
  mesh restores onto another (any device count; the data state needs the same
  number of processes).
  """
  target = sharding_lib.abstract_with_shardings(like_state)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                     data=ocp.args.JsonRestore()))
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises many kinds)
    raise CheckpointError(
        f"cannot restore checkpoint {os.path.join(str(mngr.directory), str(step))}: "
        f"{type(e).__name__}: {e}\nEither it is damaged (a missing or truncated file) or this "
        "config builds a different state (model, optimizer, stage) than the run that wrote it. "
        "Resume with that run's config (its config.json), or move the checkpoint aside to "
        "resume from an earlier one.") from e
  data_state = out["data"]
  if isinstance(data_state, dict) and "process_states" in data_state:
    states = data_state["process_states"]
    if len(states) != jax.process_count():
      raise ValueError(f"checkpoint step {step} in {mngr.directory}: its data iterator states "
                       f"are of {len(states)} processes, this run has {jax.process_count()}")
    data_state = states[jax.process_index()]
  elif jax.process_count() > 1:
    raise ValueError(f"checkpoint step {step} in {mngr.directory}: written by one process, "
                     f"this run has {jax.process_count()}; each needs its own data state")
  return out["state"], data_state


def checkpoint_dir(path: str) -> tuple[str, int]:
  """Resolves a workdir, its checkpoints/ folder, or a step folder to (checkpoints dir, step)."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")
  candidates = [path, os.path.join(path, "checkpoints")]
  for directory in candidates:
    if os.path.isdir(directory):
      steps = ocp.utils.checkpoint_steps(directory)
      if steps:
        return directory, max(steps)
  parent, name = os.path.split(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return parent, int(name)
  raise FileNotFoundError(f"no complete checkpoint under {path!r} (expected a workdir, its "
                          "checkpoints/ folder or a step folder)")


def _reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager that can read parts of the state item (the data item is known,
  so that Orbax does not warn that it cannot restore it)."""
  return ocp.CheckpointManager(directory, item_names=("state", "data"),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                              "data": ocp.JsonCheckpointHandler()})


def load_params(path: str, like_params: Any) -> Any:
  """Loads the trained params of another run's checkpoint onto `like_params`' shardings.

  Leaves that the checkpoint has replace those of `like_params`; leaves it lacks
  (a new scalar head, say) keep their fresh initialisation. A leaf whose shape
  differs is an error that names it. A PPO run's params are `{'policy', 'critic'}`:
  its policy is what a language model loads from it.
  """
  directory, step = checkpoint_dir(path)
  try:
    with _reader(directory) as mngr:
      saved = mngr.item_metadata(step)["state"]["params"]
  except Exception as e:  # pylint: disable=broad-except  (Orbax raises many kinds)
    raise CheckpointError(f"cannot read checkpoint {os.path.join(directory, str(step))} "
                          f"(from {path!r}): {type(e).__name__}: {e}") from e
  prefix = ""
  if "policy" in saved and "policy" not in like_params:
    saved, prefix = saved["policy"], "policy/"
  flat_like = traverse_util.flatten_dict(like_params, sep="/")
  target = {}
  for key, leaf in traverse_util.flatten_dict(saved, sep="/").items():
    if key not in flat_like:
      continue
    like = flat_like[key]
    if tuple(leaf.shape) != tuple(like.shape):
      raise ValueError(f"checkpoint {path!r}: params/{key} has shape {tuple(leaf.shape)}, "
                       f"the model expects {tuple(like.shape)}")
    target[key] = jax.ShapeDtypeStruct(like.shape, like.dtype, sharding=like.sharding)
  if not target:
    raise ValueError(f"checkpoint {path!r} shares no parameter with this model")
  item = {"params": traverse_util.unflatten_dict({prefix + k: v for k, v in target.items()}, sep="/")}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), item)
  args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
  with _reader(directory) as mngr:
    loaded = mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]
  if prefix:
    loaded = loaded["policy"]
  flat_like.update(traverse_util.flatten_dict(loaded, sep="/"))
  return traverse_util.unflatten_dict(flat_like, sep="/")
