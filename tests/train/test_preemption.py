"""Pre-emption with a real SIGTERM to a subprocess: the run saves and exits with status 143
(loop.PREEMPTED_EXIT_STATUS), and a pipeline or sweep stops instead of carrying on; a
pipeline stage whose input runs changed is not taken as finished."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from configs import example
from rlhf_jax.stages import example as example_stage
from rlhf_jax.testbed import pipeline
from rlhf_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG = ["--config.train.num_steps=100000", "--config.train.checkpoint_every=0",
        "--config.train.log_every=1"]


def wait_for_training(metrics_path: str, proc: subprocess.Popen, timeout: float = 300):
  """Returns once `metrics_path` holds a train record (the run is in its loop)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        if any('"split": "train"' in line for line in f):
          return
    time.sleep(0.2)
  proc.kill()
  raise AssertionError(f"no train record in {metrics_path} after {timeout}s")


def terminate(proc: subprocess.Popen) -> tuple[int, str]:
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  return proc.returncode, out


def saved_steps(workdir: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_sigterm_to_train_saves_and_exits_143(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen([sys.executable, "-m", "experiments.train", "--config=configs/example.py",
                           f"--workdir={workdir}", *LONG], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  wait_for_training(os.path.join(workdir, "metrics.jsonl"), proc)
  status, out = terminate(proc)
  assert status == loop.PREEMPTED_EXIT_STATUS == 143, out[-3000:]
  [step] = saved_steps(workdir)
  assert f"SIGTERM: saved step {step} and stopped" in out
  assert not os.path.exists(os.path.join(workdir, loop.FINAL_METRICS))


PIPELINE_SCRIPT = textwrap.dedent("""
    import sys
    from configs import example
    from rlhf_jax.testbed import pipeline
    root = sys.argv[1]
    first = example.get_config()
    first.train.update(num_steps=100000, checkpoint_every=0, log_every=1)
    first_dir = pipeline.train_stage("first", first, root)
    print("SECOND STAGE STARTS", flush=True)
    second = example.get_config()
    second.init.checkpoint = first_dir
    pipeline.train_stage("second", second, root)
""")


def test_sigterm_stops_the_pipeline_after_the_stage_saves(tmp_path):
  """Before the fix the stage returned, the pipeline went on to the next stage, exit 0."""
  root = str(tmp_path / "pipeline")
  proc = subprocess.Popen([sys.executable, "-c", PIPELINE_SCRIPT, root], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  wait_for_training(os.path.join(root, "first", "metrics.jsonl"), proc)
  status, out = terminate(proc)
  assert status == loop.PREEMPTED_EXIT_STATUS, out[-3000:]
  assert "SECOND STAGE STARTS" not in out
  assert not os.path.exists(os.path.join(root, "second"))
  [step] = saved_steps(os.path.join(root, "first"))
  assert f"[pipeline] first: pre-empted (SIGTERM) at step {step}, saved" in out


def small_config(num_steps: int, **init):
  c = example.get_config()
  c.train.update(num_steps=num_steps, checkpoint_every=4)
  c.init.update(init)
  return c


def test_stage_whose_input_run_changed_is_trained_again(tmp_path, capsys):
  root = str(tmp_path / "pipeline")
  first = pipeline.train_stage("first", small_config(8), root)
  second = pipeline.train_stage("second", small_config(8, checkpoint=first), root)
  recorded = json.load(open(os.path.join(second, pipeline.INPUTS_FILE)))
  assert recorded["init.checkpoint"]["step"] == 8
  pipeline.train_stage("second", small_config(8, checkpoint=first), root)
  assert "second: finished earlier, skipped" in capsys.readouterr().out
  loop.train(small_config(12), first, example_stage)   # the input run trains on (as after a resume)
  pipeline.train_stage("second", small_config(8, checkpoint=first), root)
  out = capsys.readouterr().out
  assert "second: its inputs changed since it was trained (init.checkpoint: step 8 -> step 12)" in out
  assert json.load(open(os.path.join(second, pipeline.INPUTS_FILE)))[
      "init.checkpoint"]["step"] == 12
  assert saved_steps(os.path.join(root, "second.stale-1")) == [4, 8]   # kept, not deleted
  assert saved_steps(second) == [4, 8]


def test_sigterm_to_a_sweep_stops_its_runs_and_exits_143(tmp_path):
  sweep = tmp_path / "sweep.py"
  sweep.write_text("def get_sweep():\n  return [{'seed': s} for s in (0, 1, 2)]\n")
  root = tmp_path / "runs"
  proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--config=configs/example.py",
                           f"--sweep={sweep}", f"--workdir={root}", "--parallel=1",
                           "--set=train.num_steps=100000", "--set=train.checkpoint_every=0",
                           "--set=train.log_every=1"], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  wait_for_training(str(root / "seed=0" / "metrics.jsonl"), proc)
  status, out = terminate(proc)
  assert status == loop.PREEMPTED_EXIT_STATUS, out[-3000:]
  assert "sweep: seed=0 exited with 143" in out
  assert len(saved_steps(str(root / "seed=0"))) == 1
  assert not (root / "seed=1").exists()                     # no run started after the signal


@pytest.mark.slow
def test_sigterm_during_quick_pipeline_pretraining_stops_it(tmp_path):
  """The reported case: `experiments.pipeline --config.quick=True`, SIGTERM in pretraining."""
  root = str(tmp_path / "pipeline")
  proc = subprocess.Popen([sys.executable, "-m", "experiments.pipeline", f"--workdir={root}",
                           "--config.quick=True", "--config.pretrain.train.num_steps=100000",
                           "--config.pretrain.train.log_every=1"], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  wait_for_training(os.path.join(root, "pretrain", "metrics.jsonl"), proc, timeout=600)
  status, out = terminate(proc)
  assert status == loop.PREEMPTED_EXIT_STATUS, out[-3000:]
  assert "pretrain: done" not in out and not os.path.exists(os.path.join(root, "sft"))
  assert len(saved_steps(os.path.join(root, "pretrain"))) == 1
