"""The AI-feedback pipeline's reports: matched-KL comparison and frontier points."""

import numpy as np
import pytest

from rlhf_jax.testbed import ai_feedback


def test_matched_kl_interpolates_each_curve_at_the_smaller_final_kl():
  curves = {"a": [{"kl": 0.5, "gold_mean": 0.1}, {"kl": 2.0, "gold_mean": 0.4},
                  {"kl": 1.0, "gold_mean": 0.2}],
            "b": [{"kl": 0.4, "gold_mean": 0.0}, {"kl": 1.6, "gold_mean": 0.6}]}
  out = ai_feedback.matched_kl(curves, "a", "b")
  # a's final KL is its last checkpoint's (1.0), b's is 1.6: compare at 1.0.
  assert out["kl"] == 1.0
  assert out["a"] == pytest.approx(0.2)
  assert out["b"] == pytest.approx(0.0 + (1.0 - 0.4) / (1.6 - 0.4) * 0.6)
  np.testing.assert_allclose(out["b"], np.interp(1.0, [0.4, 1.6], [0.0, 0.6]))


def test_frontier_points_start_each_ppo_curve_at_its_start_policy():
  def r(gold, harm):
    return {"gold_mean": gold, "harm_mean": harm}
  results = {"sft": r(0.2, 0.3), "sft_cai": r(0.15, 0.05), "dpo_human": r(0.5, 0.6),
             "dpo_ai": r(0.4, 0.4), "dpo_cai": r(0.3, 0.1),
             "ppo_curves": {"ppo_human": [r(0.4, 0.5)], "ppo_ai": [r(0.3, 0.4)],
                            "ppo_direct": [r(0.35, 0.45)],
                            "ppo_cai": [r(0.25, 0.02), r(0.3, 0.03)]}}
  points = ai_feedback.frontier_points(results)
  assert points["RL-CAI (PPO)"] == [(0.15, 0.95), (0.25, 0.98), (0.3, 0.97)]
  assert points["RLHF, helpful only (PPO)"] == [(0.2, 0.7), (0.4, 0.5)]
  assert points["d-RLAIF (PPO)"] == [(0.2, 0.7), (0.35, 0.55)]
  assert points["SL-CAI"] == [(0.15, 0.95)]
