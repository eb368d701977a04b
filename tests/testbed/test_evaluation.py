"""Tests for rlhf_jax.testbed.evaluation against loops, exact KLs and hand counts."""

import json
import math

import numpy as np
import pytest

from rlhf_jax.testbed import evaluation


def test_sequence_kl_matches_loop():
  rng = np.random.default_rng(0)
  b, n = 5, 7
  logp = rng.normal(size=(b, n)) - 2
  ref = rng.normal(size=(b, n)) - 2
  mask = (rng.uniform(size=(b, n)) < 0.7).astype(np.int32)
  per_seq = []
  for i in range(b):
    total = 0.0
    for t in range(n):
      if mask[i, t]:
        total += logp[i, t] - ref[i, t]
    per_seq.append(total)
  mean = sum(per_seq) / b
  var = sum((x - mean) ** 2 for x in per_seq) / (b - 1)
  got_mean, got_se = evaluation.sequence_kl_estimate(logp.astype(np.float32),
                                                     ref.astype(np.float32), mask)
  assert isinstance(got_mean, float) and isinstance(got_se, float)
  np.testing.assert_allclose(got_mean, mean, rtol=1e-5)
  np.testing.assert_allclose(got_se, math.sqrt(var / b), rtol=1e-5)


def test_sequence_kl_is_unbiased_for_exact_kl():
  # Two independent tokens from categoricals pi, pi_ref: KL of the pair is 2 KL(pi||ref).
  rng = np.random.default_rng(1)
  pi = rng.dirichlet(np.ones(6))
  ref = rng.dirichlet(np.ones(6))
  exact = 2 * np.sum(pi * np.log(pi / ref))
  tokens = rng.choice(6, size=(20000, 2), p=pi)
  mean, se = evaluation.sequence_kl_estimate(np.log(pi)[tokens], np.log(ref)[tokens],
                                             np.ones_like(tokens))
  assert abs(mean - exact) < 4 * se and se < 0.05 * exact


def test_sequence_kl_padding_and_edge_cases():
  logp = np.array([[-1.0, -np.inf], [-2.0, -0.5]])
  ref = np.array([[-1.5, -np.inf], [-1.0, -1.0]])
  mask = np.array([[1, 0], [1, 1]])
  mean, se = evaluation.sequence_kl_estimate(logp, ref, mask)
  np.testing.assert_allclose(mean, (0.5 + (-1.0 + 0.5)) / 2)
  np.testing.assert_allclose(se, np.std([0.5, -0.5], ddof=1) / np.sqrt(2))
  mean, se = evaluation.sequence_kl_estimate(logp[:1], ref[:1], mask[:1])
  assert mean == 0.5 and math.isnan(se)
  with pytest.raises(ValueError, match="shape"):
    evaluation.sequence_kl_estimate(logp, ref[:, :1], mask)
  with pytest.raises(ValueError, match="empty"):
    evaluation.sequence_kl_estimate(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros((0, 3)))


def test_distinct_n_hand_example():
  texts = ["the cat sat", "the cat ran"]
  # unigrams: the cat sat the cat ran -> 4 unique of 6
  assert evaluation.distinct_n(texts, 1) == pytest.approx(4 / 6)
  # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 unique of 4; none across texts
  assert evaluation.distinct_n(texts, 2) == pytest.approx(3 / 4)
  assert evaluation.distinct_n(["great great great great"], 2) == pytest.approx(1 / 3)
  assert evaluation.distinct_n(["one"], 2) == 0.0
  assert evaluation.distinct_n([], 1) == 0.0
  with pytest.raises(ValueError, match="n must be"):
    evaluation.distinct_n(texts, 0)


def test_best_of_n_kl():
  assert evaluation.best_of_n_kl(1) == 0.0
  assert evaluation.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
  # Exact KL of best-of-n over M equiprobable outcomes with distinct rewards: the best of
  # n draws has rank r with probability (r/M)^n - ((r-1)/M)^n. It tends to the formula
  # from below as M grows (the formula is exact for continuous rewards).
  for n in (2, 4, 16):
    m = 200_000
    r = np.arange(1, m + 1, dtype=np.float64)
    p = (r / m) ** n - ((r - 1) / m) ** n
    exact = np.sum(np.where(p > 0, p * np.log(p * m), 0.0))
    assert exact <= evaluation.best_of_n_kl(n) + 1e-9
    assert evaluation.best_of_n_kl(n) - exact < 1e-3
  with pytest.raises(ValueError, match="n must be"):
    evaluation.best_of_n_kl(0)


def test_summarize_policy():
  texts = ["the cat sat", "the cat ran", "a dog barked"]
  gold = np.array([0.5, -0.1, 0.9], np.float32)
  lengths = np.array([4, 6, 5])
  s = evaluation.summarize_policy(texts, gold, lengths, kl=(1.5, 0.25), num_samples=2)
  json.dumps(s, allow_nan=False)
  g = gold.astype(np.float64)
  assert s["num"] == 3
  np.testing.assert_allclose(s["gold_mean"], g.mean())
  np.testing.assert_allclose(s["gold_std"], g.std(ddof=1))
  np.testing.assert_allclose(s["gold_stderr"], g.std(ddof=1) / math.sqrt(3))
  assert s["length_mean"] == 5.0
  assert s["distinct_1"] == pytest.approx(7 / 9)
  assert s["distinct_2"] == pytest.approx(5 / 6)
  assert s["kl"] == 1.5 and s["kl_stderr"] == 0.25
  assert [x["text"] for x in s["samples"]] == texts[:2]
  np.testing.assert_allclose([x["gold"] for x in s["samples"]], g[:2])

  one = evaluation.summarize_policy(["x y"], [0.3], [2])
  json.dumps(one, allow_nan=False)
  assert one["gold_std"] is None and one["kl"] is None and one["kl_stderr"] is None
  with pytest.raises(ValueError, match="lengths"):
    evaluation.summarize_policy(texts, gold, lengths[:2])
  with pytest.raises(ValueError, match="no texts"):
    evaluation.summarize_policy([], [], [])
