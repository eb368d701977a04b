"""`experiments.label_preferences --labeler=ai` on the testbed's tiny trained policy: the
same responses and pairs as the simulated labeller, a preference dataset every stage
reads, margins that are the judge's log-odds, and flag errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.data import tfds_builders
from rlhf_jax.feedback import judge as judge_lib
from rlhf_jax.testbed import labelling
from tests.feedback import tiny
from tests.feedback.test_constitution import DEFAULT
from tests.testbed.test_label_preferences import hash_scores
from tests.testbed.test_policy import MAX_NEW, trained_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = dict(k=3, num_prompts=4, num_test_prompts=2, max_new_tokens=MAX_NEW, batch_size=6,
            score_fn=hash_scores)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  policy = trained_run()[0]
  judge = str(tmp_path_factory.mktemp("judge") / "run")
  tiny.write_run(judge, seed=4)
  return policy, judge


def test_ai_labels_the_simulated_labellers_pairs(runs, tmp_path):
  policy, judge = runs
  ai_dir = labelling.label_ai(policy, str(tmp_path / "ai"), judge, DEFAULT,
                                      principles="all", judge_batch_size=8, judge_bucket=64,
                                      **ARGS)
  sim_dir = labelling.label(policy, str(tmp_path / "sim"), temperature=0.0, **ARGS)
  meta = tfds_builders.read_metadata(ai_dir)
  assert meta["source"] == "ai" and meta["margin"] == judge_lib.MARGIN_KIND
  assert meta["labeller"]["constitution"]["principles"] == ["harmless", "helpful"]
  ai = tfds_builders.load(ai_dir, kind="preference")
  sim = tfds_builders.load(sim_dir, kind="preference")
  for split in ("train", "test"):
    ai_rows = [ai[split][i] for i in range(len(ai[split]))]
    sim_rows = [sim[split][i] for i in range(len(sim[split]))]
    pair = lambda r: (r["prompt"], frozenset((r["chosen"], r["rejected"])))
    # Same sampled responses: every pair the simulated labeller labelled (gold ties
    # excepted) is among the judge's, with the same gold scores.
    assert {pair(r) for r in sim_rows} <= {pair(r) for r in ai_rows}
    with open(os.path.join(ai_dir, f"judgements-{split}.jsonl")) as f:
      judged = [json.loads(line) for line in f]
    assert len(judged) == meta["stats"][f"{split}_pairs"] == {"train": 4, "test": 2}[split] * 3
    labelled = [j for j in judged if j["label"] != "tie"]
    assert len(labelled) == len(ai_rows)
    for row, j in zip(ai_rows, labelled):
      chosen = j["response_a"] if j["label"] == "a" else j["response_b"]
      assert row["chosen"] == chosen
      p_a = np.mean(j["p_a_shown_first"] + j["p_a_shown_second"])      # both orders, averaged
      np.testing.assert_allclose(j["p_a"], p_a, rtol=1e-9)
      np.testing.assert_allclose(row["margin"], abs(np.log(p_a) - np.log1p(-p_a)), rtol=1e-4)
      np.testing.assert_allclose(
          sorted([row["chosen_score"], row["rejected_score"]]),
          sorted(hash_scores([row["prompt"]] * 2, [j["response_a"], j["response_b"]])), atol=1e-6)
  again = labelling.label_ai(policy, str(tmp_path / "ai"), judge, DEFAULT,
                                     principles="all", judge_batch_size=8, judge_bucket=64,
                                     **ARGS)
  assert again == ai_dir                                       # idempotent: same name


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.label_preferences", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_flag_errors(runs, tmp_path):
  policy, judge = runs
  out = run_cli(f"--policy={policy}", f"--out={tmp_path}", "--labeler=ai", f"--judge={judge}",
                "--temperature=0.3")
  assert out.returncode != 0 and "--temperature does not apply to --labeler=ai" in out.stderr
  out = run_cli(f"--policy={policy}", f"--out={tmp_path}", "--judge_batch_size=4")
  assert out.returncode != 0
  assert "--judge_batch_size does not apply to --labeler=simulated" in out.stderr
  out = run_cli(f"--policy={policy}", f"--out={tmp_path}", "--labeler=ai", f"--judge={judge}",
                "--principles=kindness")
  assert out.returncode != 0 and "principles='kindness'" in out.stderr
  out = run_cli(f"--policy={policy}", f"--out={tmp_path}", "--labeler=ai")
  assert out.returncode != 0 and "needs --judge" in out.stderr
