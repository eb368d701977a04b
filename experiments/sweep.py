r"""Runs a sweep: one config, a list of overrides, one workdir and seed per run.

  python -m experiments.sweep --config=configs/dpo.py --sweep=configs/sweeps/dpo_beta.py \
      --workdir=/tmp/sweep --parallel=2 [--set=train.num_steps=50 ...]

The sweep file has `get_sweep() -> list[dict]`, each dict mapping dotted config
keys to values (e.g. {"preference.beta": 0.1, "seed": 1}); a config may define its own
`get_sweep()` instead of --sweep. Each run is `experiments.train` in a subprocess
with its own workdir (named after its overrides); runs that finished are skipped
and a killed one resumes from its checkpoint. Final metrics of every run are
gathered into workdir/results.csv and workdir/results.md. A SIGTERM to the sweep (or
to one of its runs) stops it: running runs save and stop, none starts, and the sweep
exits with status 143 (loop.PREEMPTED_EXIT_STATUS); rerun the same command to resume.
"""

import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags

from rlhf_jax.train import loop

_CONFIG = flags.DEFINE_string("config", None, "Base config file (configs/<stage>.py).")
_SWEEP = flags.DEFINE_string("sweep", "", "Sweep file with get_sweep(); default: the config's own.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory: one subdirectory per run.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time (processes).")
_SET = flags.DEFINE_multi_string("set", [], "Overrides for every run, key=value (dotted keys).")
flags.mark_flags_as_required(["config", "workdir"])


def load_sweep(path: str) -> list[dict[str, Any]]:
  spec = importlib.util.spec_from_file_location("sweep_module", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path}: defines no get_sweep()")
  runs = module.get_sweep()
  if not runs or not all(isinstance(r, dict) for r in runs):
    raise ValueError(f"{path}: get_sweep() must return a non-empty list of dicts")
  return runs


def run_name(overrides: dict[str, Any]) -> str:
  """A readable, filesystem-safe name from a run's overrides."""
  parts = [f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())]
  return re.sub(r"[^A-Za-z0-9_.=,-]", "_", ",".join(parts)) or "default"


def command(config: str, workdir: str, overrides: dict[str, Any], common: list[str]) -> list[str]:
  flags_ = [f"--config.{k}={v}" for k, v in sorted(overrides.items())]
  flags_ += [f"--config.{s}" for s in common]
  return [sys.executable, "-m", "experiments.train", f"--config={config}",
          f"--workdir={workdir}", *flags_]


def run_all(config: str, runs: list[dict], root: str, parallel: int, common: list[str]) -> list[dict]:
  """Runs what has not finished, `parallel` at a time; returns one result row per run."""
  names = [run_name(r) for r in runs]
  if len(set(names)) != len(names):
    raise ValueError("sweep: two runs have the same overrides")
  pending = [(n, r) for n, r in zip(names, runs)
             if loop.read_final_metrics(os.path.join(root, n)) is None]
  print(f"sweep: {len(runs)} runs, {len(runs) - len(pending)} finished, {len(pending)} to run")
  active: list[tuple[str, subprocess.Popen]] = []
  failed, preempted, signalled = [], [], set()

  def finish(name, proc):
    if proc.wait() == loop.PREEMPTED_EXIT_STATUS:
      preempted.append(name)
    elif proc.returncode != 0:
      failed.append(name)
    active.remove((name, proc))
    print(f"sweep: {name} exited with {proc.returncode}")

  def wait_for_one():
    """Reaps finished runs; on pre-emption passes SIGTERM on to the runs still going."""
    if preempted:
      for name, proc in active:
        if name not in signalled:
          signalled.add(name)
          proc.send_signal(signal.SIGTERM)
    done = [(n, p) for n, p in active if p.poll() is not None]
    for n, p in done:
      finish(n, p)
    if not done:
      time.sleep(0.5)

  # A SIGTERM to the sweep (or a run's exit status 143) stops it: the runs still going are
  # signalled, save and stop; none is started; the sweep exits 143 (rerun to resume).
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: preempted.append("sweep"))
  try:
    for name, overrides in pending:
      while len(active) >= parallel and not preempted:
        wait_for_one()
      if preempted:
        break
      workdir = os.path.join(root, name)
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "log.txt"), "a") as log:
        active.append((name, subprocess.Popen(command(config, workdir, overrides, common),
                                              stdout=log, stderr=subprocess.STDOUT)))
      print(f"sweep: started {name}")
    while active:
      wait_for_one()
  finally:
    signal.signal(signal.SIGTERM, previous)
  if preempted:
    print(f"sweep: pre-empted ({', '.join(preempted)}); the runs saved and stopped; exit status "
          f"{loop.PREEMPTED_EXIT_STATUS}, rerun the same command to resume")
    raise SystemExit(loop.PREEMPTED_EXIT_STATUS)
  if failed:
    raise RuntimeError(f"sweep: runs failed (see their log.txt): {failed}")
  rows = []
  for name, overrides in zip(names, runs):
    metrics = loop.read_final_metrics(os.path.join(root, name)) or {}
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    rows.append({"run": name, **overrides, **scalars})
  return rows


def write_tables(rows: list[dict], root: str) -> None:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(os.path.join(root, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main(argv):
  del argv
  sweep_file = _SWEEP.value or _CONFIG.value
  runs = load_sweep(sweep_file)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "sweep.json"), "w") as f:
    json.dump({"config": _CONFIG.value, "sweep": sweep_file, "runs": runs, "set": _SET.value}, f, indent=1)
  rows = run_all(_CONFIG.value, runs, _WORKDIR.value, _PARALLEL.value, _SET.value)
  write_tables(rows, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
