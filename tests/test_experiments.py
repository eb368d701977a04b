"""The main job and the reproductions, end to end in their quick modes (what CI runs).

The full-size runs are the README's commands; here every stage runs through the
same code with tiny settings, and the outputs are checked for shape and sense.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=900):
  out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  return out.stdout


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  run(["experiments.pipeline", f"--workdir={workdir}", "--config.quick=True"])
  return workdir


def test_pipeline_quick_writes_its_table_and_skips_when_rerun(pipeline_dir):
  with open(os.path.join(pipeline_dir, "results.json")) as f:
    results = json.load(f)
  assert set(results) == {"pretrained", "sft", "ppo", "dpo", "best_of_4"}
  for name, r in results.items():
    assert -1.0 <= r["gold_mean"] <= 1.0, name
    assert r["kl"] is None or r["kl"] > -1.0, name
  assert abs(results["sft"]["kl"]) < 1e-6       # the SFT policy against itself
  assert "| ppo |" in open(os.path.join(pipeline_dir, "results.md")).read()
  with open(os.path.join(pipeline_dir, "reward", "gold_correlation.json")) as f:
    report = json.load(f)
  assert report["samples"] == 64 and -1.0 <= report["pearson"] <= 1.0
  assert -1.0 <= report["spearman"] <= 1.0 and "accuracy" in report["heldout_pairs"]
  again = run(["experiments.pipeline", f"--workdir={pipeline_dir}", "--config.quick=True"])
  for stage in ("pretrain", "sft", "labels", "reward", "ppo", "dpo"):
    assert f"{stage}: finished earlier, skipped" in again


def test_reproduce_dpo_frontier_quick(pipeline_dir, tmp_path):
  run(["experiments.reproduce_dpo_frontier", f"--workdir={tmp_path}", "--quick",
       f"--base={pipeline_dir}"])
  with open(tmp_path / "frontier.csv") as f:
    rows = list(csv.DictReader(f))
  methods = {r["method"] for r in rows}
  assert methods == {"SFT", "DPO", "PPO (learned RM)", "PPO (gold reward)", "Preferred-FT"}
  assert os.path.getsize(tmp_path / "frontier.png") > 10_000


def test_reproduce_overoptimization_quick(pipeline_dir, tmp_path):
  run(["experiments.reproduce_overoptimization", f"--workdir={tmp_path}", "--quick",
       f"--base={pipeline_dir}"])
  with open(tmp_path / "overoptimization.csv") as f:
    rows = list(csv.DictReader(f))
  bon = [r for r in rows if r["method"] == "best-of-n"]
  assert sorted({int(r["n_or_step"]) for r in bon}) == [1, 2, 4, 8, 16]
  # Best-of-n selects on the proxy: the proxy reward of the chosen sample never falls with n.
  for rm in {r["rm"] for r in bon}:
    proxy = [float(r["proxy"]) for r in sorted((r for r in bon if r["rm"] == rm),
                                               key=lambda r: int(r["n_or_step"]))]
    assert all(b >= a - 1e-6 for a, b in zip(proxy, proxy[1:]))
  assert "alpha" in open(tmp_path / "overoptimization.md").read()
  assert os.path.getsize(tmp_path / "overoptimization.png") > 10_000


def test_evaluate_policy_of_a_dpo_run_takes_the_references_prompts(pipeline_dir, tmp_path):
  out = tmp_path / "eval.json"
  run(["experiments.evaluate_policy", f"--policy={pipeline_dir}/dpo",
       f"--reference={pipeline_dir}/sft", "--num_prompts=8", "--max_new_tokens=8",
       f"--out={out}"])
  with open(out) as f:
    result = json.load(f)
  assert result["num"] == 8 and result["kl"] is not None and -1.0 <= result["gold_mean"] <= 1.0
  failed = subprocess.run([sys.executable, "-m", "experiments.evaluate_policy",
                           f"--policy={pipeline_dir}/dpo", "--num_prompts=8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert failed.returncode != 0 and "--prompts_from" in failed.stderr
