"""Fault injection: SIGKILL a training run at random moments, resume it, compare.

Each try trains the example stage (`python -m experiments.train --config=configs/example.py`)
in a fresh workdir, kills it with SIGKILL one to three times (at a random moment of a run,
or the moment a checkpoint's temporary directory appears, i.e. while Orbax writes it),
then reruns the same command to the end. The resumed run's metrics.jsonl must equal the
uninterrupted run's, record for record and bit for bit, and its final metrics too.

  python -m pytest -q -p no:xdist tests/test_fault_injection.py -m slow -s   # 10 tries
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config.train.num_steps=40", "--config.train.checkpoint_every=5",
         "--config.train.log_every=1", "--config.train.eval_every=10",
         "--config.train.keep_checkpoints=2"]
TMP_MARK = ".orbax-checkpoint-tmp"


def command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "experiments.train", "--config=configs/example.py",
          f"--workdir={workdir}", *FLAGS]


def start(workdir: str) -> subprocess.Popen:
  return subprocess.Popen(command(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def checkpoint_in_progress(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  try:
    return any(TMP_MARK in name for name in os.listdir(directory))
  except FileNotFoundError:
    return False


def kill_at_random_time(proc: subprocess.Popen, delay: float) -> None:
  try:
    proc.wait(timeout=delay)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGKILL)


def kill_during_checkpoint(proc: subprocess.Popen, workdir: str, nth: int) -> None:
  """SIGKILL as soon as the `nth` checkpoint write of this process is seen under way."""
  seen, was_writing = 0, False
  while proc.poll() is None:
    writing = checkpoint_in_progress(workdir)
    if writing and not was_writing:
      seen += 1
      if seen == nth:
        proc.send_signal(signal.SIGKILL)
        return
    was_writing = writing
    time.sleep(0.0005)


def records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def final_metrics(workdir: str) -> dict:
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    return json.load(f)


def run_to_end(workdir: str) -> float:
  began = time.monotonic()
  out = subprocess.run(command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return time.monotonic() - began


def fault_injection(tmp_path, tries: int, seed: int, kills: int | None = None) -> dict:
  """Runs `tries` kill-and-resume tries (`kills` a try, default 1 to 3 at random); returns
  counts of what was hit."""
  reference = str(tmp_path / "uninterrupted")
  duration = run_to_end(reference)
  expected, expected_final = records(reference), final_metrics(reference)
  assert [r["step"] for r in expected if r["split"] == "train"] == list(range(1, 41))
  rng = random.Random(seed)
  summary = {"tries": tries, "seed": seed, "kills": 0, "kills_during_checkpoint_write": 0,
             "kills_after_exit": 0, "resumed_equal": 0}
  for t in range(tries):
    workdir = str(tmp_path / f"try_{t}")
    # Alternate: even tries kill during a checkpoint write first, odd ones at a random time.
    for k in range(kills or rng.randint(1, 3)):
      proc = start(workdir)
      if (t + k) % 2 == 0:
        kill_during_checkpoint(proc, workdir, nth=rng.randint(1, 3))
      else:
        kill_at_random_time(proc, rng.uniform(0.5, duration))
      status = proc.wait()
      if status == -signal.SIGKILL:
        summary["kills"] += 1
        summary["kills_during_checkpoint_write"] += checkpoint_in_progress(workdir)
      else:
        assert status == 0, proc.stderr.read()[-3000:]
        summary["kills_after_exit"] += 1          # it finished before the kill came
      proc.stderr.close()
    run_to_end(workdir)
    got = records(workdir)
    assert len(got) == len(expected), (t, len(got), len(expected))
    for a, b in zip(got, expected):
      assert a == b, (t, a, b)
    assert final_metrics(workdir) == expected_final
    summary["resumed_equal"] += 1
  print("fault injection:", json.dumps(summary))
  return summary


def test_sigkill_and_resume_short(tmp_path):
  """CI's variant: one try, killed while a checkpoint is being written."""
  summary = fault_injection(tmp_path, tries=1, seed=0, kills=1)
  assert summary["resumed_equal"] == 1
  assert summary["kills_during_checkpoint_write"] == 1


@pytest.mark.slow
def test_sigkill_and_resume(tmp_path):
  summary = fault_injection(tmp_path, tries=10, seed=1)
  assert summary["resumed_equal"] == 10
  assert summary["kills_during_checkpoint_write"] >= 3
