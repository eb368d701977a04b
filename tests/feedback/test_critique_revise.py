"""`experiments.critique_revise`: prompts from a JSONL file, a demonstration dataset the
SFT stage's 'dataset' source reads unchanged, the inspection JSONL, errors."""

import json
import os
import subprocess
import sys

import pytest

from configs import sft_revisions
from rlhf_jax.data import sources
from rlhf_jax.data import tfds_builders
from tests.feedback import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["The film", "Honestly, the acting was", "I", "What a", "Bad"]


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.critique_revise", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_and_prompts(tmp_path_factory):
  root = tmp_path_factory.mktemp("cai")
  tiny.write_run(str(root / "run"), seed=1)
  prompts = root / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
  return str(root / "run"), str(prompts)


def test_cli_writes_a_demonstration_dataset_sft_reads(model_and_prompts, tmp_path):
  model, prompts = model_and_prompts
  out = run_cli(f"--model={model}", f"--out={tmp_path}", f"--prompts={prompts}",
                "--num_prompts=3", "--num_test_prompts=2", "--rounds=2", "--principles=all",
                "--response_tokens=5", "--critique_tokens=4", "--revision_tokens=6",
                "--batch_size=2", "--bucket=64", "--stop=\\n")
  assert out.returncode == 0, out.stderr[-2000:]
  dataset_dir = next(line.split()[1] for line in out.stdout.splitlines()
                     if line.startswith("wrote "))
  assert "train: 3 prompts" in out.stdout
  with open(os.path.join(dataset_dir, "revisions-train.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["prompt"] for r in records] == PROMPTS[:3]
  for r in records:
    assert [s["principle"] for s in r["rounds"]] == ["harmless", "helpful"]
    assert r["revision"] == r["rounds"][1]["revision"]
    assert all("\n" not in s["critique"] + s["revision"] for s in r["rounds"])   # --stop
  config = sft_revisions.get_config()
  config.data.dataset_dir = dataset_dir
  found, _ = sources.prepare("demonstration", config.data, str(tmp_path / "data"))
  assert found == dataset_dir
  train = tfds_builders.load(found, kind="demonstration")["train"]
  kept = [r for r in records if r["revision"].strip()]
  assert [train[i] for i in range(len(train))] == [
      {"prompt": r["prompt"], "response": r["revision"]} for r in kept]
  meta = tfds_builders.read_metadata(dataset_dir)
  assert meta["source"] == "critique_revise" and meta["options"]["rounds"] == 2


def test_cli_errors(model_and_prompts, tmp_path):
  model, prompts = model_and_prompts
  out = run_cli(f"--model={model}", f"--out={tmp_path}", f"--prompts={prompts}",
                "--num_prompts=4", "--num_test_prompts=2")
  assert out.returncode != 0
  assert "has 5 prompts, --num_prompts + --num_test_prompts = 6" in out.stderr
  out = run_cli(f"--model={model}", f"--out={tmp_path}", f"--prompts={prompts}",
                "--principles=kindness")
  assert out.returncode != 0 and "principles='kindness'" in out.stderr
  bad = tmp_path / "bad.json"
  bad.write_text('{"name": "x",\n "principles": [}')
  out = run_cli(f"--model={model}", f"--out={tmp_path}", f"--constitution={bad}")
  assert out.returncode != 0 and f"{bad}: line 2 column" in out.stderr
