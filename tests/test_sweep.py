"""The sweep runner: expands, runs in parallel, skips finished runs, gathers a table."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_runs_skips_and_gathers(tmp_path):
  sweep = tmp_path / "sweep.py"
  sweep.write_text("def get_sweep():\n  return [{'optimizer.learning_rate': lr, 'seed': 0}"
                   " for lr in (1e-3, 3e-3)]\n")
  args = [sys.executable, "-m", "experiments.sweep", "--config=configs/sft.py",
          f"--sweep={sweep}", f"--workdir={tmp_path / 'runs'}", "--parallel=2",
          "--set=train.num_steps=2", "--set=train.eval_batches=1", "--set=data.corpus_train=300",
          "--set=data.corpus_test=50", "--set=model.max_len=96", "--set=data.seq_len=96",
          f"--set=data.data_dir={tmp_path / 'data'}"]
  first = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
  with open(tmp_path / "runs" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["optimizer.learning_rate"] for r in rows] == ["0.001", "0.003"]
  assert all(float(r["loss"]) > 0 for r in rows)
  again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert "2 finished, 0 to run" in again.stdout
