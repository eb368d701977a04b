"""Metric writers: metrics.jsonl, TensorBoard event files and a console line.

Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import math
import os
import time

from absl import logging
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
    """Closes both files; an error closing them (a full disk) is logged, not raised, so that
    it neither hides the error that ended the run nor leaves TensorBoard's thread running."""
    if not self.enabled:
      return
    for name, f in (("metrics.jsonl", self._jsonl), ("tensorboard", self._tb)):
      try:
        f.close()
      except OSError as e:
        logging.warning("closing %s: %s", name, e)
    if self._tb.all_writers:   # its close failed (a full disk): stop its flush thread and
      for file_writer in self._tb.all_writers.values():   # its flush at exit, which would fail
        events = file_writer.event_writer                  # again after the real error
        try:
          if events._worker is not None:  # pylint: disable=protected-access
            events._worker.stop()         # pylint: disable=protected-access
        except Exception:  # pylint: disable=broad-except
          pass
        events._closed = True             # pylint: disable=protected-access
    self.enabled = False


def truncate_jsonl(workdir: str, last_step: int, eval_from: int | None = None) -> None:
  """Drops records after `last_step` (and eval records at steps >= `eval_from`, a final
  evaluation about to run again), so a resumed run's metrics.jsonl reads as an
  uninterrupted one. A half-written last line (a kill mid-write) is dropped; a bad line
  elsewhere is an error naming file and line."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (ValueError, KeyError, TypeError) as e:
      if number == len(lines) and not line.endswith("\n"):
        logging.warning("%s:%d: dropped a half-written last record", path, number)
        continue
      raise ValueError(f"{path}:{number}: not a metrics record ({e}); fix or remove the "
                       "line to resume") from None
    if step > last_step or (eval_from is not None and record.get("split") == "eval"
                            and step >= eval_from):
      continue
    kept.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
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
