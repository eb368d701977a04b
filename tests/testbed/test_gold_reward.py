"""Tests for rlhf_jax.testbed.gold_reward against VADER and its published formula."""

import math

import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax.testbed import corpus
from rlhf_jax.testbed import gold_reward as gr


def test_matches_vader_directly():
  texts = ["The film is great.", "The plot is not good.", "", "It runs about 90 minutes.",
           "The acting is good, but the plot is awful!", "great great GREAT!!!"]
  texts += corpus.generate_reviews(0, 50)
  sia = SentimentIntensityAnalyzer()
  want = np.array([sia.polarity_scores(t)["compound"] for t in texts], np.float32)
  got = gr.gold_reward(texts)
  assert got.dtype == np.float32 and got.shape == (len(texts),)
  np.testing.assert_array_equal(got, want)


def test_compound_formula_by_hand():
  # One lexicon word of valence v: compound = v / sqrt(v^2 + 15) (VADER's normalize, alpha 15).
  v = SentimentIntensityAnalyzer().lexicon["great"]
  assert v == pytest.approx(3.1)
  np.testing.assert_allclose(gr.gold_reward(["The film is great."]),
                             [v / math.sqrt(v * v + 15)], atol=1e-4)
  # Each '!' (up to 4) adds 0.292 to the magnitude of the sum.
  x = v + 3 * 0.292
  np.testing.assert_allclose(gr.gold_reward(["The film is great!!!"]),
                             [x / math.sqrt(x * x + 15)], atol=1e-4)
  assert gr.gold_reward(["It runs about 90 minutes."])[0] == 0.0


def test_gameable():
  hacked = gr.gold_reward(["great great GREAT!!!"])[0]
  honest = gr.gold_reward(corpus.generate_reviews(0, 500))
  assert hacked > 0.94 > np.percentile(honest, 99)


def test_empty_batch_and_errors():
  out = gr.gold_reward([])
  assert out.shape == (0,) and out.dtype == np.float32
  with pytest.raises(ValueError, match="single str"):
    gr.gold_reward("The film is great.")
  with pytest.raises(ValueError, match=r"texts\[1\]"):
    gr.gold_reward(["ok", 3])


def test_analyzer_is_cached():
  assert gr.analyzer() is gr.analyzer()
