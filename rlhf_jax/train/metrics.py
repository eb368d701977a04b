"""Metric writers: metrics.jsonl, TensorBoard event files and a console line.

Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import math
import os
import time

import jax
import numpy as np


def to_python(metrics: dict) -> dict:
  """Device or numpy scalars -> plain Python floats/ints (JSON-serialisable)."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    out[k] = v.item() if v.ndim == 0 else v.tolist()
  return out


class MetricWriter:
  """Appends one JSON object a line to `workdir/metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, stage: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.stage = stage
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # imported lazily: heavy, and only process 0 needs it
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def write(self, step: int, metrics: dict, split: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "stage": self.stage, "split": split, **to_python(metrics)}
    self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if isinstance(v, (int, float)) and k != "step":
        self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def truncate_jsonl(workdir: str, last_step: int) -> None:
  """Drops records after `last_step`, so a resumed run's metrics.jsonl reads as an uninterrupted one."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l)["step"] <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(lines)
  os.replace(tmp, path)


class Progress:
  """Console progress: steps/s and time left."""

  def __init__(self, total_steps: int, first_step: int):
    self.total, self.first = total_steps, first_step
    self.start = time.perf_counter()

  def line(self, step: int, metrics: dict) -> str:
    elapsed = time.perf_counter() - self.start
    done = step - self.first
    rate = done / elapsed if elapsed > 0 else float("nan")
    left = (self.total - step) / rate if rate > 0 else float("nan")
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                     if isinstance(v, (int, float)) and not isinstance(v, bool))
    eta = f"{left:.0f}s" if math.isfinite(left) else "?"
    return f"step {step}/{self.total} | {rate:.2f} steps/s | {eta} left | {shown}"


def log_console(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)
