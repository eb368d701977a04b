"""Simulated preference labelling: determinism, exact labels at temperature 0, errors."""

import glob
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from rlhf_jax.testbed import labelling
from rlhf_jax.data import sources
from rlhf_jax.data import tfds_builders
from rlhf_jax.testbed import policy as policy_lib
from tests.testbed.test_policy import MAX_NEW, trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K = 3


def hash_scores(prompts, responses):
  """A stand-in gold reward in [-1, 1] that rarely ties: the few-step test policy writes
  gibberish, which VADER scores like the prompt alone (every pair a tie)."""
  return np.array([zlib.crc32((p + r).encode()) % 2001 / 1000 - 1
                   for p, r in zip(prompts, responses)], np.float32)


ARGS = dict(k=K, num_prompts=6, num_test_prompts=3, max_new_tokens=MAX_NEW, batch_size=9,
            score_fn=hash_scores)


@pytest.fixture(scope="module")
def workdir():
  return trained_run()[0]


@pytest.fixture(scope="module")
def exact(workdir, tmp_path_factory):
  """Labels at annotator temperature 0 (twice with seed 0, once with seed 1)."""
  dirs = [labelling.label(workdir, str(tmp_path_factory.mktemp(f"out{i}")), seed=seed,
                                  temperature=0.0, **ARGS)
          for i, seed in enumerate((0, 0, 1))]
  return dirs


def array_records(dataset_dir):
  files = sorted(glob.glob(os.path.join(dataset_dir, "*.array_record*")))
  assert {os.path.basename(f).split("-")[1] for f in files} == {"train.array_record",
                                                                 "test.array_record"}
  return {os.path.basename(f): open(f, "rb").read() for f in files}


def test_same_seed_byte_identical_other_seed_differs(exact):
  first, again, other = (array_records(d) for d in exact)
  assert first == again
  assert first.keys() == other.keys() and first != other


def test_temperature_zero_labels_agree_with_gold(exact):
  dataset_dir = exact[0]
  meta = tfds_builders.read_metadata(dataset_dir)
  stats = meta["stats"]
  splits = tfds_builders.load(dataset_dir, kind="preference")
  for split, num_prompts in (("train", 6), ("test", 3)):
    records = [splits[split][i] for i in range(len(splits[split]))]
    assert stats[f"{split}_pairs"] == num_prompts * K * (K - 1) // 2       # 'all' pairs
    assert stats[f"{split}_labelled"] == len(records) > 0
    assert stats[f"{split}_labelled"] + stats[f"{split}_ties"] == stats[f"{split}_pairs"]
    assert stats[f"{split}_agreement_rate"] == 1.0
    for r in records:
      # Scores are those of prompt + response, recomputed here.
      gold = hash_scores([r["prompt"]] * 2, [r["chosen"], r["rejected"]])
      np.testing.assert_allclose([r["chosen_score"], r["rejected_score"]], gold, atol=1e-6)
      assert r["chosen_score"] > r["rejected_score"]
  # Train prompts are the first train prompts, test prompts held-out ones.
  config = policy_lib.read_config(meta["policy"])
  prompt_dir, _ = sources.prompts(config.data, os.path.join(meta["policy"], "data"))
  prompt_splits = tfds_builders.load(prompt_dir, kind="prompt")
  for split, n in (("train", 6), ("test", 3)):
    allowed = {prompt_splits[split][i]["prompt"] for i in range(n)}
    assert {splits[split][i]["prompt"] for i in range(len(splits[split]))} <= allowed
  assert meta["labeller"] == {"k": K, "temperature": 0.0, "flip_rate": 0.0,
                              "pairs_per_prompt": "all", "tie_eps": 0.0, "seed": 0}
  # The reward / DPO stages read it as source 'dataset'.
  config.data.update(source="dataset", dataset_dir=dataset_dir)
  assert sources.preferences(config.data, "")[0] == dataset_dir


def test_flip_rate_half_is_noisy_and_adjacent_pairs(workdir, tmp_path):
  dataset_dir = labelling.label(workdir, str(tmp_path), seed=0, temperature=0.0,
                                        flip_rate=0.5, pairs_per_prompt="adjacent", **ARGS)
  stats = tfds_builders.read_metadata(dataset_dir)["stats"]
  assert stats["train_pairs"] == 6 * (K - 1) and stats["test_pairs"] == 3 * (K - 1)
  assert stats["train_flipped"] > 0
  assert stats["train_agree_with_gold"] == stats["train_labelled"] - stats["train_flipped"]


def test_errors(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    labelling.label(str(tmp_path / "nowhere"), str(tmp_path / "out"), **ARGS)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    labelling.label(str(tmp_path / "empty"), str(tmp_path / "out"), **ARGS)
  with pytest.raises(ValueError, match="k must be an int >= 2"):
    labelling.label(workdir, str(tmp_path / "out"), **dict(ARGS, k=1))
  with pytest.raises(ValueError, match="pairs_per_prompt"):
    labelling.label(workdir, str(tmp_path / "out"), pairs_per_prompt="some", **ARGS)
  # --out pointing into a prepared dataset of another kind (the run's prompt dataset).
  config = policy_lib.read_config(workdir)
  prompt_dir, _ = sources.prompts(config.data, os.path.join(workdir, "data"))
  kind_dir = os.path.dirname(os.path.dirname(prompt_dir))
  for out in (prompt_dir, kind_dir, os.path.dirname(kind_dir)):   # it, its kind, the data root
    with pytest.raises(ValueError, match="'(prompt|demonstration)' dataset"):
      labelling.label(workdir, out, **ARGS)
  assert not os.path.exists(tmp_path / "out")


def test_command_line_error_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.label_preferences", f"--policy={tmp_path}/nowhere",
       f"--out={tmp_path}/out", "--k=4"], cwd=ROOT, capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
  assert result.returncode == 1
  assert "label_preferences: error: policy" in result.stderr and "nowhere" in result.stderr
  assert "Traceback" not in result.stderr
