"""The loop: resume equals an uninterrupted run, NaN stops without a checkpoint, SIGTERM saves,
one run per workdir, metrics.jsonl reads as one run, bad configs named before any work."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import types
import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from rlhf_jax.data import pipeline
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import loop
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import step as step_lib
from rlhf_jax.train import validate
from rlhf_jax.train import workdir as workdir_lib
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
    with pytest.raises(loop.Preempted) as stopped:
      loop.train(c, workdir, toy_stage)
  finally:
    toy_stage.CountingIterator.__next__ = original_next
  assert (stopped.value.step, stopped.value.code) == (8, loop.PREEMPTED_EXIT_STATUS)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["8"]


def stage_with(**functions):
  """The example stage with some of its functions replaced."""
  return types.SimpleNamespace(**{name: functions.get(name, getattr(toy_stage, name))
                                  for name in ("make_data", "init", "make_step", "evaluate")})


def all_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@jax.custom_vjp
def _poison_gradient(w, flag):
  return w


_poison_gradient.defvjp(lambda w, flag: (w, flag),
                        lambda flag, g: (g * jnp.where(flag > 0, jnp.nan, 1.0), None))


def test_finite_loss_with_nan_gradients_stops_before_saving(tmp_path):
  """Batch 5 leaves the loss finite and makes the gradient NaN (as DPO with beta=1e38 does)."""
  def loss_fn(params, extras, batch, rng):
    w = _poison_gradient(params["w"], jnp.max(batch["poison"]))
    return toy_stage.loss_fn({"w": w}, extras, batch, rng)

  def make_data(config, workdir):
    data = toy_stage.make_data(config, workdir)
    original = data.train.__class__.__next__

    class Poisoned(data.train.__class__):
      def __next__(self):
        batch = original(self)
        batch["poison"] = np.full(len(batch["x"]), float(self.index == 5), np.float32)
        return batch
    data.train.__class__ = Poisoned
    return data

  stage = stage_with(make_data=make_data,
                     make_step=lambda config: step_lib.make_train_step(loss_fn, config))
  workdir = str(tmp_path / "nan_grad")
  with pytest.raises(loop.NonFiniteLossError, match="grad_norm is nan at step 5"):
    loop.train(toy_config(checkpoint_every=1, log_every=1), workdir, stage)
  assert checkpoint_steps(workdir) == [1, 2, 3, 4]
  assert all(math.isfinite(m["loss"]) for m in read_metrics(workdir))


def test_nan_parameters_are_never_saved():
  params = {"w": jnp.ones((2, 2)), "b": jnp.asarray([1.0, jnp.inf]), "i": jnp.zeros(3, jnp.int32)}
  with pytest.raises(loop.NonFiniteLossError, match="step 7"):
    loop.check_params_finite(params, 7)
  loop.check_params_finite({"w": jnp.ones((2, 2)), "i": jnp.zeros(3, jnp.int32)}, 7)


def test_keep_checkpoints_zero_keeps_every_checkpoint(tmp_path):
  workdir = str(tmp_path / "keep_all")
  loop.train(toy_config(keep_checkpoints=0, checkpoint_every=2), workdir, toy_stage)
  assert checkpoint_steps(workdir) == [2, 4, 6, 8, 10, 12]
  assert "already trained" not in str(loop.train(toy_config(keep_checkpoints=0), workdir,
                                                 toy_stage))


def kill_at_index(index):
  """Patches the example iterator to raise Killed when asked for batch `index` (0-based)."""
  original_next = toy_stage.CountingIterator.__next__

  def killed(self):
    if self.index == index:
      raise Killed()
    return original_next(self)
  return unittest.mock.patch.object(toy_stage.CountingIterator, "__next__", killed)


class Killed(Exception):
  pass


def test_rerun_after_kill_before_first_checkpoint_logs_each_step_once(tmp_path):
  full, parted = str(tmp_path / "full"), str(tmp_path / "parted")
  loop.train(toy_config(log_every=1), full, toy_stage)
  with kill_at_index(3), pytest.raises(Killed):   # steps 1-3 logged, the first checkpoint is step 4
    loop.train(toy_config(log_every=1), parted, toy_stage)
  assert [m["step"] for m in read_metrics(parted)] == [1, 2, 3]
  loop.train(toy_config(log_every=1), parted, toy_stage)
  assert all_metrics(parted) == all_metrics(full)


def test_rerun_of_finished_run_keeps_one_final_evaluation(tmp_path):
  workdir = str(tmp_path / "done")
  first = loop.train(toy_config(), workdir, toy_stage)
  records = all_metrics(workdir)
  assert [m["step"] for m in records if m["split"] == "eval"] == [12]
  assert loop.train(toy_config(), workdir, toy_stage) == first
  assert all_metrics(workdir) == records


def test_half_written_last_metrics_line_is_dropped_on_resume(tmp_path):
  full, parted = str(tmp_path / "full"), str(tmp_path / "parted")
  loop.train(toy_config(), full, toy_stage)
  with kill_at_index(5), pytest.raises(Killed):
    loop.train(toy_config(), parted, toy_stage)
  with open(os.path.join(parted, "metrics.jsonl"), "a") as f:
    f.write('{"step": 6, "split": "tra')           # a kill in the middle of a write
  loop.train(toy_config(), parted, toy_stage)
  assert all_metrics(parted) == all_metrics(full)


def test_corrupt_metrics_line_in_the_middle_names_file_and_line(tmp_path):
  workdir = str(tmp_path / "bad")
  with kill_at_index(5), pytest.raises(Killed):
    loop.train(toy_config(log_every=1), workdir, toy_stage)
  path = os.path.join(workdir, "metrics.jsonl")
  lines = open(path).readlines()
  lines[1] = "garbage\n"
  open(path, "w").writelines(lines)
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
    loop.train(toy_config(log_every=1), workdir, toy_stage)


def test_second_run_in_a_workdir_fails_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "busy")
  with workdir_lib.lock(workdir, enabled=True):
    with pytest.raises(workdir_lib.WorkdirInUseError,
                       match=f"in use by process {os.getpid()} on host {socket.gethostname()}"):
      loop.train(toy_config(), workdir, toy_stage)
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_lock_of_a_dead_process_does_not_block_a_resume(tmp_path):
  workdir = str(tmp_path / "stale")
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys; from rlhf_jax.train import workdir as w\n"
      f"with w.lock({workdir!r}, enabled=True): print('locked', flush=True); sys.stdin.read()")],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(workdir_lib.WorkdirInUseError, match=f"process {holder.pid} on host"):
    loop.train(toy_config(), workdir, toy_stage)
  holder.kill()                                      # kill -9: no cleanup runs
  holder.wait()
  assert f'"pid": {holder.pid}' in open(os.path.join(workdir, workdir_lib.LOCK_FILE)).read()
  loop.train(toy_config(), workdir, toy_stage)
  assert checkpoint_steps(workdir)[-1] == 12


class DroppingIterator:
  """Records 0..15 in order, forever; odd records do not fit (the transform gives None)."""

  def __init__(self, seed, batch_size):
    self.it = pipeline.TrainIterator(list(range(16)), self.transform, batch_size, seed)
    self.seed = seed

  def transform(self, record):
    if record % 2:
      return None
    rng = np.random.default_rng([self.seed, record])
    x = rng.normal(size=4).astype(np.float32)
    return {"x": x, "y": (x @ np.arange(8, dtype=np.float32).reshape(4, 2) / 8)}

  def __next__(self):
    return next(self.it)

  stats = property(lambda self: self.it.stats)
  get_state = lambda self: self.it.get_state()
  set_state = lambda self, state: self.it.set_state(state)


def test_dropped_records_are_reported_in_metrics_and_on_console(tmp_path, capsys):
  def make_data(config, workdir):
    return loop.Data(train=DroppingIterator(config.seed, config.data.batch_size),
                     eval=toy_stage.make_data(config, workdir).eval)

  workdir = str(tmp_path / "drops")
  loop.train(toy_config(num_steps=4, log_every=2), workdir, stage_with(make_data=make_data))
  reports = [m for m in all_metrics(workdir) if m["split"] == "data"]
  expected, same_iterator = [], DroppingIterator(0, 8)
  for step in range(1, 5):
    next(same_iterator)
    if step % 2 == 0:    # logged steps; 8 kept examples a step, the odd records dropped
      stats = same_iterator.stats
      assert stats["records_read"] - stats["dropped"] == 8 * step and stats["dropped"] > 0
      expected.append((step, stats["dropped"], stats["records_read"]))
  assert [(m["step"], m["data/train_dropped"], m["data/train_records_read"])
          for m in reports] == expected
  assert (f"data: {expected[-1][1]} of {expected[-1][2]} train records read so far were dropped"
          in capsys.readouterr().out)


def test_resume_with_an_incompatible_config_keeps_config_json(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train(toy_config(), workdir, toy_stage)
  config_json = open(os.path.join(workdir, "config.json")).read()
  changed = toy_config(num_steps=20)
  changed.optimizer.grad_clip_norm = 0.0         # another optimizer state: cannot restore
  with pytest.raises(checkpoint_lib.CheckpointError,
                     match=f"cannot restore checkpoint {re.escape(workdir)}/checkpoints/12"):
    loop.train(changed, workdir, toy_stage)
  assert open(os.path.join(workdir, "config.json")).read() == config_json


def test_checkpoint_missing_its_metadata_is_named(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train(toy_config(num_steps=4), workdir, toy_stage)
  step_dir = os.path.join(workdir, "checkpoints", "4")
  removed = [os.path.join(root, f) for root, _, files in os.walk(step_dir)
             for f in files if f == "_METADATA"]
  assert removed
  for path in removed:
    os.remove(path)
  with pytest.raises(checkpoint_lib.CheckpointError, match=re.escape(step_dir)):
    loop.train(toy_config(num_steps=8), workdir, toy_stage)


def failing_stage():
  def make_data(config, workdir):
    raise AssertionError("make_data ran before the config was checked")
  return stage_with(make_data=make_data)


@pytest.mark.parametrize("field, value, message", [
    ("train.log_every", 0, r"config.train.log_every=0: expected an int >= 1"),
    ("train.num_steps", -1, r"config.train.num_steps=-1: expected an int >= 0"),
    ("train.checkpoint_every", -2, r"config.train.checkpoint_every=-2"),
    ("train.keep_checkpoints", -1, r"config.train.keep_checkpoints=-1"),
    ("optimizer.grad_accum_steps", 0, r"config.optimizer.grad_accum_steps=0: expected an int >= 1"),
    ("optimizer.grad_accum_steps", 3, r"config.data.batch_size=8 does not split into "
                                      r"config.optimizer.grad_accum_steps=3"),
    ("data.batch_size", 12, r"config.data.batch_size=12: expected a positive multiple of the 8 "
                            r"data-parallel devices \(mesh.data=8xmesh.fsdp=1\)"),
    ("data.eval_batch_size", 4, r"config.data.eval_batch_size=4: expected a positive multiple "
                                r"of the 8 data-parallel devices"),
])
def test_bad_config_fields_are_named_before_any_work(tmp_path, field, value, message):
  c = toy_config()
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(validate.ConfigError, match=message):
    loop.train(c, str(tmp_path / "bad"), failing_stage())


def test_learned_positions_longer_than_the_table_are_named(tmp_path):
  c = toy_config()
  c.model.update(position="learned", max_len=64)
  c.data.seq_len = 96
  with pytest.raises(validate.ConfigError, match=r"config.data.seq_len=96 exceeds "
                                                 r"config.model.max_len=64"):
    loop.train(c, str(tmp_path / "bad"), failing_stage())
  assert not validate.problems(base.get_config(), sharding_lib.make_mesh(c.mesh))


DISK_FULL_SCRIPT = """
import errno, sys
import tensorboardX.record_writer
from configs import example
from rlhf_jax.stages import example as stage
from rlhf_jax.train import checkpoint, loop

def full(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")
tensorboardX.record_writer.RecordWriter.flush = full   # every later write of the disk fails
checkpoint.save = full
loop.train(example.get_config(), sys.argv[1], stage)
"""


def test_disk_full_ends_with_the_real_error_not_shutdown_noise(tmp_path):
  out = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert out.returncode == 1
  last_line = out.stderr.strip().splitlines()[-1]
  assert last_line == "OSError: [Errno 28] No space left on device", out.stderr[-3000:]
  assert "Exception ignored" not in out.stderr and "Exception in thread" not in out.stderr
