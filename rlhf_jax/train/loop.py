"""The one training loop every stage plugs into.

A stage is a module with four functions (see ARCHITECTURE.md):
  make_data(config, workdir)        -> Data(train=checkpointable iterator, eval=callable)
  init(config, rng, mesh)           -> TrainState, already sharded on `mesh`
  make_step(config)                 -> pure (state, batch, rng) -> (state, metrics)
  evaluate(config, state, data, mesh, rng) -> dict of metrics
The loop checks the config (train/validate) and locks the workdir (train/workdir)
first, then shards each batch, calls the jitted step, logs, evaluates, checkpoints,
and stops on a non-finite loss, gradient norm or parameter (nothing of it saved) or on
SIGTERM (the step saved, then Preempted: exit status 143).
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import distributed
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import validate
from rlhf_jax.train import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Data:
  """A stage's data: a checkpointable train iterator and a source of eval batches."""
  train: Iterator[dict]           # also has get_state() / set_state(state)
  eval: Callable[[], Any] | None  # () -> iterable of eval batches (numpy dicts)
  stats: dict = dataclasses.field(default_factory=dict)  # counts from preparation (skipped, truncated)


class NonFiniteLossError(FloatingPointError):
  """A step's loss or gradient norm is NaN or infinite."""


# What a step reports that must be finite: the loss, and the gradient norm (a finite loss can
# come with non-finite gradients, which would turn every parameter into NaN).
def _must_be_finite(key: str) -> bool:
  return key == "loss" or key.endswith("grad_norm")


def _check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetches pending step metrics; raises on the first non-finite loss or gradient norm."""
  fetched = []
  for step, metrics in pending:
    host = metrics_lib.to_python(metrics)
    for key in sorted(k for k in host if _must_be_finite(k)):
      value = host[key]
      if isinstance(value, float) and not math.isfinite(value):
        raise NonFiniteLossError(
            f"{key} is {value} at step {step} (loss {host.get('loss')}); stopping. No "
            "checkpoint of this or later steps is kept: the latest checkpoint is the last "
            "finite one.")
    fetched.append((step, host))
  return fetched


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_params_finite(params, step: int) -> None:
  """Raises NonFiniteLossError if any floating-point parameter is NaN or infinite."""
  leaves = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if leaves and not bool(_all_finite(leaves)):
    raise NonFiniteLossError(f"parameters are not finite at step {step}; stopping without "
                             "saving: the latest checkpoint is the last finite one.")


# Exit status of a run stopped by SIGTERM after saving (128 + SIGTERM, the shell's convention),
# so that a scheduler can tell pre-emption (rerun to resume) from completion (0) and failure (1).
PREEMPTED_EXIT_STATUS = 143


class Preempted(SystemExit):
  """Raised by `train` after a SIGTERM, once the step is saved; exits with status 143.

  A SystemExit, so that no `except Exception` between the loop and the entry point can
  swallow it and carry on (a pipeline must not train its next stage on a half-trained one).
  """

  def __init__(self, step: int, workdir: str):
    super().__init__(PREEMPTED_EXIT_STATUS)
    self.step, self.workdir = step, workdir

  def __str__(self) -> str:
    return f"pre-empted (SIGTERM) at step {self.step} in {self.workdir}; saved, rerun to resume"


def count_tokens(batch: dict) -> int:
  """Non-pad tokens a batch feeds the model: every `mask` / `*_mask` except loss masks."""
  return int(sum(np.sum(v) for k, v in batch.items()
                 if (k == "mask" or k.endswith("_mask")) and "loss" not in k))


FINAL_METRICS = "final_metrics.json"


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The resolved config as workdir/config.json (atomically, process 0): the run's description."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


def write_final_metrics(workdir: str, metrics: dict) -> None:
  """Marks a finished run: its final eval metrics, written atomically by process 0."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, FINAL_METRICS)
  with open(path + ".tmp", "w") as f:
    json.dump(metrics, f, sort_keys=True, indent=1)
  os.replace(path + ".tmp", path)


def read_final_metrics(workdir: str) -> dict | None:
  """The final metrics of a finished run, or None if it has not finished."""
  path = os.path.join(workdir, FINAL_METRICS)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(init, step, eval) keys of a run: everything random in a run derives from its seed."""
  return tuple(jax.random.split(jax.random.key(seed), 3))


def jit_step(stage, config: ml_collections.ConfigDict, state, mesh):
  """`stage.make_step(config)` jitted with the state's shardings, batch split over the batch
  axes, replicated rng and metrics, and the state donated."""
  shardings = sharding_lib.shardings_of(state)
  return jax.jit(stage.make_step(config),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh),
                               sharding_lib.replicated(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))


def _train_drops(iterator) -> tuple[float, float] | None:
  """(records dropped, records read) by a train iterator that counts them, over all processes."""
  stats = getattr(iterator, "stats", None)
  if not isinstance(stats, dict) or "dropped" not in stats:
    return None
  return (distributed.global_sum(stats["dropped"]),
          distributed.global_sum(stats.get("records_read", 0)))


def train(config: ml_collections.ConfigDict, workdir: str, stage) -> dict:
  """Runs (or resumes) `stage` for config.train.num_steps; returns the last eval metrics.

  Raises validate.ConfigError before any work on a bad config, workdir.WorkdirInUseError
  if another live process trains in `workdir`, NonFiniteLossError on a non-finite loss,
  gradient norm or parameter (nothing of that step saved), and Preempted (exit status
  143) after saving the current step on SIGTERM.
  """
  mesh = sharding_lib.make_mesh(config.mesh)
  validate.check(config, mesh)
  with workdir_lib.lock(workdir):
    return _train(config, workdir, stage, mesh)


def _train(config: ml_collections.ConfigDict, workdir: str, stage, mesh) -> dict:
  init_rng, step_rng, eval_rng = run_keys(config.seed)
  tc = config.train

  with jax.set_mesh(mesh):
    data = distributed.process_zero_first(lambda: stage.make_data(config, workdir), "make_data")
    state = stage.init(config, init_rng, mesh)
    mngr = checkpoint_lib.manager(workdir, tc.keep_checkpoints)
    start = 0
    if mngr.latest_step() is not None:
      start = mngr.latest_step()
      state, data_state = checkpoint_lib.restore(mngr, start, state)
      data.train.set_state(data_state)
    # Only now, with the checkpoint restored: a config that cannot resume leaves the run's
    # description as it was. Records after the checkpoint (all of them on a fresh start)
    # and a final evaluation that is about to run again are dropped, so the file reads as
    # one uninterrupted run.
    write_config(config, workdir)
    metrics_lib.truncate_jsonl(workdir, start if mngr.latest_step() is not None else -1,
                               eval_from=tc.num_steps)
    if start:
      metrics_lib.log_console(f"resumed from step {start} in {workdir}")
    writer = metrics_lib.MetricWriter(workdir, config.stage)
    try:
      return _run(config, workdir, stage, mesh, data, state, mngr, writer, start,
                  step_rng, eval_rng)
    finally:
      writer.close()
      mngr.close()


def _run(config, workdir, stage, mesh, data, state, mngr, writer, start, step_rng, eval_rng):
  tc = config.train
  if data.stats and start == 0:   # once, so a resumed run's metrics.jsonl reads as one run
    writer.write(start, {f"data/{k}": v for k, v in data.stats.items()}, split="data")
  drops = _train_drops(data.train)
  reported_drops = drops[0] if drops else 0

  step_fn = jit_step(stage, config, state, mesh)

  def run_eval(step):
    if data.eval is None:
      return {}
    metrics = stage.evaluate(config, state, data, mesh, jax.random.fold_in(eval_rng, step))
    writer.write(step, metrics, split="eval")
    metrics_lib.log_console(f"eval @ {step}: " + " ".join(
        f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float))))
    return metrics

  def save(step):
    check_params_finite(state.params, step)
    checkpoint_lib.save(mngr, step, state, data.train.get_state())

  def report_drops(step):
    nonlocal reported_drops
    drops = _train_drops(data.train)
    if drops and drops[0] != reported_drops:
      reported_drops = drops[0]
      writer.write(step, {"data/train_dropped": int(drops[0]),
                          "data/train_records_read": int(drops[1])}, split="data")
      metrics_lib.log_console(
          f"data: {int(drops[0])} of {int(drops[1])} train records read so far were dropped "
          f"(they do not fit: too long for data.seq_len={config.data.get('seq_len')}?)")

  progress = metrics_lib.Progress(tc.num_steps, start)
  pending: list[tuple[int, dict]] = []
  eval_metrics: dict = {}
  tokens_seen, last_time = 0, time.perf_counter()
  with distributed.preemption_watch() as reached_preemption:
    for step in range(start + 1, tc.num_steps + 1):
      host_batch = next(data.train)
      tokens_seen += count_tokens(host_batch)
      batch = sharding_lib.put_batch(host_batch, mesh)
      state, metrics = step_fn(state, batch, jax.random.fold_in(step_rng, step))
      pending.append((step, metrics))
      preempted = reached_preemption(step)

      is_last = step == tc.num_steps
      checkpoint_now = is_last or preempted or (tc.checkpoint_every and step % tc.checkpoint_every == 0)
      if step % tc.log_every == 0 or checkpoint_now:
        fetched = _check_finite(pending)
        pending = []
        now = time.perf_counter()
        for s, m in fetched:
          writer.write(s, m)
        report_drops(step)
        tokens_seen = distributed.global_sum(tokens_seen)    # each process counted its shard
        last = dict(fetched[-1][1], tokens_per_second=tokens_seen / (now - last_time))
        tokens_seen, last_time = 0, now
        metrics_lib.log_console(progress.line(step, last))
      if tc.eval_every and step % tc.eval_every == 0 and not is_last:
        eval_metrics = run_eval(step)
      if checkpoint_now:
        save(step)
      if preempted:
        metrics_lib.log_console(f"SIGTERM: saved step {step} and stopped (exit status "
                                f"{PREEMPTED_EXIT_STATUS}); rerun the same command to resume")
        raise Preempted(step, workdir)
    if start >= tc.num_steps:
      metrics_lib.log_console(f"already trained to step {start}; evaluating only")
    eval_metrics = run_eval(tc.num_steps)
  write_final_metrics(workdir, eval_metrics)
  return eval_metrics
