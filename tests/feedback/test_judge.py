"""The AI labeller: probabilities against a hand-computed softmax of the judge's logits,
order-swap symmetry, position-bias statistics, the dataset it writes, an rlhf_jax run
as the judge, errors."""

import json
import os

import numpy as np
import pytest

from rlhf_jax.data import tfds_builders
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import judge
from rlhf_jax.feedback import models
from tests.feedback import tiny
from tests.feedback.test_constitution import DEFAULT

PROMPTS = ["The film", "Honestly, the acting was", "I"]
A = [" was a joy from start to finish.", " wooden.", " liked it"]
B = [" was dull.", " superb, every one of them a delight", " hated every minute of it."]


@pytest.fixture(scope="module")
def lm():
  return tiny.byte_lm()


@pytest.fixture(scope="module")
def constitution():
  return constitution_lib.load(DEFAULT)


def plain(c):
  return constitution_lib.make_format(c, "plain")


def hand_prob_a(model, params, c, prompt, a, b, principles):
  """P(a > b): softmax over the logits of 'A' and 'B' after the hand-written comparison
  text, in both orders, averaged over orders and principles."""
  option_ids = [ord("A") + 3, ord("B") + 3]
  probs = []
  for p in principles:
    question = c.principles[p].comparison_question
    for first, second, a_is_first in ((a, b, True), (b, a, False)):
      text = (f"Review (A): {prompt}{first}\nReview (B): {prompt}{second}\n"
              f"Question: {question}\nAnswer: (")
      logits = tiny.full_forward_last_logits(model, params, tiny.byte_ids(text))[option_ids]
      p_first = np.exp(tiny.log_softmax(logits))[0]
      probs.append(p_first if a_is_first else 1 - p_first)
  return float(np.mean(probs))


@pytest.mark.parametrize("mode", ["all", "sample"])
def test_probabilities_are_the_softmax_of_the_option_logits(lm, constitution, mode):
  principles = constitution_lib.choose_principles(constitution, len(PROMPTS), mode, 1)
  # batch_size 2: several batches, each padded (to a multiple of 64 tokens).
  j = judge.judge_pairs(lm, constitution, plain(constitution), PROMPTS, A, B, principles,
                        batch_size=2, bucket=64)
  expected = [hand_prob_a(lm.model, lm.params, constitution, *args, ps)
              for *args, ps in zip(PROMPTS, A, B, principles)]
  assert np.ptp(expected) > 0.05          # the random judge does tell the pairs apart
  np.testing.assert_allclose(j.prob_a, expected, rtol=2e-5)
  np.testing.assert_allclose(np.exp(j.log_prob_b), 1 - np.asarray(expected), rtol=2e-5)
  np.testing.assert_allclose(j.margin, np.log(expected) - np.log1p(-np.asarray(expected)),
                             rtol=1e-4)


def test_swapping_a_and_b_gives_one_minus_p(lm, constitution):
  principles = constitution_lib.choose_principles(constitution, len(PROMPTS), "all", 0)
  fmt = plain(constitution)
  ab = judge.judge_pairs(lm, constitution, fmt, PROMPTS, A, B, principles, batch_size=4)
  ba = judge.judge_pairs(lm, constitution, fmt, PROMPTS, B, A, principles, batch_size=4)
  np.testing.assert_array_equal(ba.margin, -ab.margin)
  np.testing.assert_array_equal(ba.log_prob_a, ab.log_prob_b)
  np.testing.assert_allclose(ba.prob_a, 1 - ab.prob_a, rtol=0, atol=1e-15)
  # The single-order verdicts are not symmetric: this judge has a position bias.
  assert not np.allclose(ab.gap_ab, -ab.gap_ba, atol=1e-3)


def test_combine_and_position_bias_by_hand():
  gap_ab = np.array([[2.0], [-1.0], [0.5]])
  gap_ba = np.array([[1.0], [-3.0], [0.5]])
  sig = lambda x: 1 / (1 + np.exp(-x))
  log_a, log_b = judge.combine(gap_ab, gap_ba)
  p_a = (sig(gap_ab) + sig(-gap_ba))[:, 0] / 2
  np.testing.assert_allclose(np.exp(log_a), p_a, rtol=1e-12)
  np.testing.assert_allclose(np.exp(log_b), 1 - p_a, rtol=1e-12)
  j = judge.Judgements(gap_ab, gap_ba, [(0,)] * 3, log_a, log_b)
  bias = judge.position_bias(j)
  p_first = sig(np.concatenate([gap_ab[:, 0], gap_ba[:, 0]]))
  np.testing.assert_allclose(bias["p_first_mean"], p_first.mean(), rtol=1e-12)
  np.testing.assert_allclose(bias["position_bias_before"], p_first.mean() - 0.5, rtol=1e-12)
  assert bias["first_wins_rate"] == 4 / 6
  # Every pair's first shown wins in one order and loses in the other: inconsistent.
  assert bias["order_consistency"] == 0.0
  assert bias["position_bias_after"] < 1e-15
  # Averaged: pair 0 (s(2) > s(1)) and pair 1 (s(3) > s(1)) choose a; pair 2 is a tie.
  assert j.margin[2] == 0.0 and bias["first_chosen_rate"] == 2 / 3


def test_records_and_written_dataset(lm, constitution, tmp_path):
  principles = constitution_lib.choose_principles(constitution, len(PROMPTS), "sample", 0)
  j = judge.judge_pairs(lm, constitution, plain(constitution), PROMPTS, A, B, principles)
  scores_a, scores_b = [0.5, -0.2, 0.1], [0.1, 0.3, 0.1]
  records, stats = judge.preference_records(PROMPTS, A, B, j, scores_a, scores_b)
  assert stats["labelled"] == len(records) == 3 and stats["ties"] == 0
  expected_agree = sum(((m > 0) == (sa > sb)) for m, sa, sb in
                       zip(j.margin[:2], scores_a[:2], scores_b[:2]))
  assert stats["gold_decided"] == 2 and stats["agree_with_gold"] == expected_agree
  for i, r in enumerate(records):
    a_wins = j.margin[i] > 0
    assert (r["chosen"], r["rejected"]) == ((A[i], B[i]) if a_wins else (B[i], A[i]))
    assert r["margin"] == abs(j.margin[i]) > 0
    np.testing.assert_allclose(1 / (1 + np.exp(-r["margin"])), max(j.prob_a[i], 1 - j.prob_a[i]))
    assert r["chosen_score"] == (scores_a[i] if a_wins else scores_b[i])
  names = [p.name for p in constitution.principles]
  rows = judge.judgement_rows(PROMPTS, A, B, j, names)
  dataset_dir = judge.write_dataset(str(tmp_path), "ai-test", {"train": records, "test": records},
                                    {"train": rows, "test": rows}, {"stats": stats}, True)
  meta = tfds_builders.read_metadata(dataset_dir)
  assert meta["margin"] == judge.MARGIN_KIND and meta["with_scores"]
  loaded = tfds_builders.load(dataset_dir, kind="preference")["train"]
  for i, r in enumerate(records):
    assert loaded[i]["chosen"] == r["chosen"]
    np.testing.assert_allclose(loaded[i]["margin"], r["margin"], rtol=1e-6)   # float32
  with open(os.path.join(dataset_dir, "judgements-test.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert [line["label"] for line in lines] == ["a" if m > 0 else "b" for m in j.margin]
  assert lines[0]["principles"] == [names[principles[0][0]]]


def test_a_run_workdir_loads_as_the_judge(constitution, tmp_path):
  model, params = tiny.write_run(str(tmp_path / "run"), seed=3)
  lm = models.load(str(tmp_path / "run"))
  assert lm.kind == "run" and lm.chat_template == "" and lm.tokenizer.bos_id == 1
  j = judge.judge_pairs(lm, constitution, plain(constitution), PROMPTS[:1], A[:1], B[:1],
                        [(1,)])
  np.testing.assert_allclose(j.prob_a, [hand_prob_a(model, params, constitution, PROMPTS[0],
                                                    A[0], B[0], (1,))], rtol=2e-5)


def test_errors(lm, constitution, tmp_path):
  fmt = plain(constitution)
  bad = constitution_lib.from_dict(dict(json.load(open(DEFAULT)), options=["Yes", "No"]),
                                   "bad.json")
  with pytest.raises(ValueError, match=r"bad.json: field options: option 'Yes' is 3 tokens"):
    judge.judge_pairs(lm, bad, fmt, PROMPTS, A, B, [(0,)] * 3)
  short = tiny.byte_lm(max_len=64)
  with pytest.raises(ValueError, match=r"judge prompt 0 is \d+ tokens; .* max_len=64"):
    judge.judge_pairs(short, constitution, fmt, PROMPTS, A, B, [(0,)] * 3)
  with pytest.raises(ValueError, match="same number"):
    judge.judge_pairs(lm, constitution, fmt, PROMPTS, A, B, [(0,), (0, 1), (1,)])
  with pytest.raises(FileNotFoundError, match="no config.json"):
    models.load(str(tmp_path))


def test_progress_line_reports_rate_and_time_left(capsys):
  now = [100.0]
  progress = models.Progress("judge", 100, "pairs", every_s=10.0, clock=lambda: now[0])
  now[0] = 105.0
  progress.update(50)                                  # 5 s since the start: too soon
  assert capsys.readouterr().out == ""
  now[0] = 110.0
  progress.update(40)
  assert capsys.readouterr().out == "judge: 40/100 pairs, 4.0 pairs/s, 0:15 left\n"
  now[0] = 111.0
  progress.update(100)                                 # the end is always printed
  assert capsys.readouterr().out == "judge: 100/100 pairs, 9.1 pairs/s, 0:00 left\n"
