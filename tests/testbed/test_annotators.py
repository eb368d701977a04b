"""Tests for rlhf_jax.testbed.annotators against the Bradley-Terry model they simulate."""

import itertools
import json

import numpy as np
import pytest

from rlhf_jax.testbed import annotators


def make_inputs(num_prompts=50, k=4, seed=0, levels=None):
  rng = np.random.default_rng(seed)
  if levels:  # few distinct values, so that many pairs tie
    scores = rng.integers(0, levels, size=(num_prompts, k)) / (levels - 1)
  else:
    scores = rng.uniform(-1, 1, size=(num_prompts, k))
  prompts = [f"prompt {p}" for p in range(num_prompts)]
  responses = [[f"response {p}.{i}" for i in range(k)] for p in range(num_prompts)]
  return prompts, responses, scores


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_temperature_zero_agrees_with_gold_and_counts_ties():
  prompts, responses, scores = make_inputs(levels=3)
  records, stats = annotators.label_pairs(prompts, responses, scores, rng_seed=0,
                                          temperature=0.0)
  expected_ties = sum(scores[p, i] == scores[p, j] for p in range(len(prompts))
                      for i, j in itertools.combinations(range(4), 2))
  assert expected_ties > 50
  assert stats["pairs"] == 50 * 6
  assert stats["ties"] == expected_ties
  assert stats["labelled"] == len(records) == 50 * 6 - expected_ties
  assert stats["agree_with_gold"] == stats["labelled"] and stats["agreement_rate"] == 1.0
  assert stats["flipped"] == 0
  for r in records:
    assert r["chosen_score"] > r["rejected_score"]


def test_tie_eps():
  prompts, responses, scores = make_inputs(num_prompts=200)
  _, stats = annotators.label_pairs(prompts, responses, scores, rng_seed=0,
                                    temperature=0.0, tie_eps=0.1)
  diffs = np.array([abs(scores[p, i] - scores[p, j]) for p in range(200)
                    for i, j in itertools.combinations(range(4), 2)])
  assert stats["ties"] == int(np.sum(diffs <= 0.1)) > 0


def test_temperature_matches_sigmoid_model():
  prompts, responses, scores = make_inputs(num_prompts=3000, k=4, seed=1)
  t = 0.5
  records, stats = annotators.label_pairs(prompts, responses, scores, rng_seed=3,
                                          temperature=t)
  diffs = np.array([abs(scores[p, i] - scores[p, j]) for p in range(3000)
                    for i, j in itertools.combinations(range(4), 2)])
  p_agree = sigmoid(diffs / t)
  expected = p_agree.mean()
  se = np.sqrt(np.sum(p_agree * (1 - p_agree))) / len(p_agree)
  observed = stats["agreement_rate"]
  assert stats["labelled"] == len(diffs) == len(records)
  assert abs(observed - expected) < 2 * se, (observed, expected, se)
  assert 0.6 < observed < 0.9  # noisy, far from both 0.5 and 1
  # Binned: within each |diff| bin the agreement follows sigmoid(|diff| / T).
  agree = np.array([r["chosen_score"] > r["rejected_score"] for r in records])
  rec_diffs = np.array([abs(r["chosen_score"] - r["rejected_score"]) for r in records])
  for lo, hi in [(0.0, 0.3), (0.3, 0.8), (0.8, 2.0)]:
    sel = (rec_diffs >= lo) & (rec_diffs < hi)
    p = sigmoid(rec_diffs[sel] / t)
    se_bin = np.sqrt(np.sum(p * (1 - p))) / sel.sum()
    assert abs(agree[sel].mean() - p.mean()) < 3 * se_bin


def test_flip_rate():
  prompts, responses, scores = make_inputs(num_prompts=1000, seed=2)
  _, stats = annotators.label_pairs(prompts, responses, scores, rng_seed=0,
                                    temperature=0.0, flip_rate=0.2)
  n = stats["labelled"]
  # At temperature 0 a label disagrees with gold exactly when it was flipped.
  assert stats["agree_with_gold"] == n - stats["flipped"]
  assert abs(stats["flipped"] / n - 0.2) < 3 * np.sqrt(0.2 * 0.8 / n)


@pytest.mark.parametrize("kwargs, match", [
    (dict(flip_rate=1.0), "flip_rate"),
    (dict(flip_rate=0.6), "flip_rate"),
    (dict(flip_rate=-0.1), "flip_rate"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(tie_eps=-1.0), "tie_eps"),
    (dict(pairs_per_prompt="some"), "pairs_per_prompt"),
    (dict(pairs_per_prompt=7), "pairs_per_prompt"),
    (dict(pairs_per_prompt=0), "pairs_per_prompt"),
])
def test_bad_arguments_raise(kwargs, match):
  prompts, responses, scores = make_inputs(num_prompts=3)
  args = dict(rng_seed=0, temperature=0.5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    annotators.label_pairs(prompts, responses, scores, **args)


def test_shapes_raise():
  prompts, responses, scores = make_inputs(num_prompts=3, k=1)
  with pytest.raises(ValueError, match="k >= 2"):
    annotators.label_pairs(prompts, responses, scores, rng_seed=0, temperature=0.5)
  prompts, responses, scores = make_inputs(num_prompts=3)
  with pytest.raises(ValueError, match="must be equal"):
    annotators.label_pairs(prompts[:2], responses, scores, rng_seed=0, temperature=0.5)
  with pytest.raises(ValueError, match="must be equal"):
    annotators.label_pairs(prompts, responses, scores[:2], rng_seed=0, temperature=0.5)
  with pytest.raises(ValueError, match=r"responses\[1\]"):
    annotators.label_pairs(prompts, [responses[0], responses[1][:3], responses[2]], scores,
                           rng_seed=0, temperature=0.5)
  with pytest.raises(ValueError, match=r"\[num_prompts, k\]"):
    annotators.label_pairs(prompts, responses, scores[:, 0], rng_seed=0, temperature=0.5)
  scores[2, 1] = np.nan
  with pytest.raises(ValueError, match=r"scores\[2, 1\] is not finite"):
    annotators.label_pairs(prompts, responses, scores, rng_seed=0, temperature=0.5)


def test_deterministic_from_seed():
  prompts, responses, scores = make_inputs(num_prompts=100)
  run = lambda seed: annotators.label_pairs(prompts, responses, scores, rng_seed=seed,
                                            temperature=0.5, flip_rate=0.1,
                                            pairs_per_prompt=3)
  a, stats_a = run(0)
  b, stats_b = run(0)
  c, _ = run(1)
  assert json.dumps(a).encode() == json.dumps(b).encode() and stats_a == stats_b
  assert json.dumps(a) != json.dumps(c)


@pytest.mark.parametrize("mode, per_prompt", [("all", 10), ("adjacent", 4), (3, 3)])
def test_pairs_per_prompt_and_records(mode, per_prompt):
  prompts, responses, scores = make_inputs(num_prompts=20, k=5)
  records, stats = annotators.label_pairs(prompts, responses, scores, rng_seed=0,
                                          temperature=0.0, pairs_per_prompt=mode)
  assert stats["pairs"] == len(records) == 20 * per_prompt
  seen = set()
  for rec in records:
    assert set(rec) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score",
                        "margin"}
    p = int(rec["prompt"].split()[1])
    i, j = responses[p].index(rec["chosen"]), responses[p].index(rec["rejected"])
    assert rec["chosen_score"] == scores[p, i] and rec["rejected_score"] == scores[p, j]
    assert rec["margin"] == 0.0
    pair = (p, min(i, j), max(i, j))
    assert pair not in seen  # pairs are distinct
    seen.add(pair)
    if mode == "adjacent":
      assert abs(i - j) == 1
  assert [r["prompt"] for r in records] == sorted((r["prompt"] for r in records),
                                                  key=lambda s: int(s.split()[1]))
