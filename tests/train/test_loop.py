"""The loop: resume equals an uninterrupted run, NaN stops without a checkpoint, SIGTERM saves."""

import json
import os
import signal

import pytest

from configs import base
from rlhf_jax.train import loop
from rlhf_jax.stages import example as toy_stage


def toy_config(**train):
  c = base.get_config()
  c.stage = "example"
  c.data.batch_size = 8
  c.train.update(num_steps=12, log_every=2, eval_every=0, checkpoint_every=4, keep_checkpoints=5)
  c.train.update(**train)
  c.optimizer.warmup_steps = 2
  c.nan_at = 0
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if json.loads(l)["split"] == "train"]


def test_resume_equals_uninterrupted(tmp_path):
  full = str(tmp_path / "full")
  loop.train(toy_config(), full, toy_stage)
  parted = str(tmp_path / "parted")

  class Killed(Exception):
    pass

  def killed_before_step_7(self):
    if self.index == 6:   # steps 5 and 6 were logged, but only step 4 checkpointed
      raise Killed()
    return original_next(self)

  original_next = toy_stage.CountingIterator.__next__
  toy_stage.CountingIterator.__next__ = killed_before_step_7
  try:
    with pytest.raises(Killed):
      loop.train(toy_config(), parted, toy_stage)
  finally:
    toy_stage.CountingIterator.__next__ = original_next
  assert [m["step"] for m in read_metrics(parted)] == [1, 2, 3, 4, 5, 6]
  loop.train(toy_config(), parted, toy_stage)   # resumes from step 4
  a, b = read_metrics(full), read_metrics(parted)
  assert [m["step"] for m in a] == list(range(1, 13))
  assert [m["step"] for m in b] == list(range(1, 13))
  for x, y in zip(a, b):
    assert x["loss"] == y["loss"], (x, y)   # bit for bit
    assert x["grad_norm"] == y["grad_norm"]


def test_nan_stops_and_keeps_no_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  c = toy_config(checkpoint_every=2, log_every=1)
  c.nan_at = 5
  with pytest.raises(loop.NonFiniteLossError, match="step 5"):
    loop.train(c, workdir, toy_stage)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [2, 4]


def test_sigterm_saves_and_exits(tmp_path):
  workdir = str(tmp_path / "term")
  c = toy_config(checkpoint_every=0, num_steps=50)
  original_next = toy_stage.CountingIterator.__next__

  def next_with_signal(self):
    if self.index == 7:
      os.kill(os.getpid(), signal.SIGTERM)
    return original_next(self)

  toy_stage.CountingIterator.__next__ = next_with_signal
  try:
    out = loop.train(c, workdir, toy_stage)
  finally:
    toy_stage.CountingIterator.__next__ = original_next
  assert out == {"preempted_at": 8}
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["8"]
