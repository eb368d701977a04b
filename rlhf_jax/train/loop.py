"""The one training loop every stage plugs into.

A stage is a module with four functions (see ARCHITECTURE.md):
  make_data(config, workdir)        -> Data(train=checkpointable iterator, eval=callable)
  init(config, rng, mesh)           -> TrainState, already sharded on `mesh`
  make_step(config)                 -> pure (state, batch, rng) -> (state, metrics)
  evaluate(config, state, data, mesh, rng) -> dict of metrics
The loop shards each batch, calls the jitted step, logs, evaluates, checkpoints,
and stops on a non-finite loss or SIGTERM.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import distributed
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train import sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class Data:
  """A stage's data: a checkpointable train iterator and a source of eval batches."""
  train: Iterator[dict]           # also has get_state() / set_state(state)
  eval: Callable[[], Any] | None  # () -> iterable of eval batches (numpy dicts)
  stats: dict = dataclasses.field(default_factory=dict)  # counts from preparation (skipped, truncated)


class NonFiniteLossError(FloatingPointError):
  pass


def _check_finite(pending: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """Fetches pending step metrics; raises on the first non-finite loss, naming its step."""
  fetched = []
  for step, metrics in pending:
    host = metrics_lib.to_python(metrics)
    loss = host.get("loss")
    if loss is not None and not math.isfinite(loss):
      raise NonFiniteLossError(
          f"loss is {loss} at step {step}; stopping. No checkpoint of this or later "
          "steps is kept: the latest checkpoint is the last finite one.")
    fetched.append((step, host))
  return fetched


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


def train(config: ml_collections.ConfigDict, workdir: str, stage) -> dict:
  """Runs (or resumes) `stage` for config.train.num_steps; returns the last eval metrics."""
  mesh = sharding_lib.make_mesh(config.mesh)
  init_rng, step_rng, eval_rng = run_keys(config.seed)
  write_config(config, workdir)
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
      metrics_lib.truncate_jsonl(workdir, start)
      metrics_lib.log_console(f"resumed from step {start} in {workdir}")
    writer = metrics_lib.MetricWriter(workdir, config.stage)
    if data.stats and start == 0:   # once, so a resumed run's metrics.jsonl reads as one run
      writer.write(start, {f"data/{k}": v for k, v in data.stats.items()}, split="data")

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
      checkpoint_lib.save(mngr, step, state, data.train.get_state())

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
          tokens_seen = distributed.global_sum(tokens_seen)    # each process counted its shard
          last = dict(fetched[-1][1], tokens_per_second=tokens_seen / (now - last_time))
          tokens_seen, last_time = 0, now
          metrics_lib.log_console(progress.line(step, last))
        if tc.eval_every and step % tc.eval_every == 0 and not is_last:
          eval_metrics = run_eval(step)
        if checkpoint_now:
          save(step)
        if preempted:
          metrics_lib.log_console(f"SIGTERM: saved step {step} and stopped")
          writer.close()
          return {"preempted_at": step}
      if start >= tc.num_steps:
        metrics_lib.log_console(f"already trained to step {start}; evaluating only")
      eval_metrics = run_eval(tc.num_steps)
  writer.close()
  write_final_metrics(workdir, eval_metrics)
  return eval_metrics
