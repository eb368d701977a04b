"""Tests for rlhf_jax.testbed.corpus: determinism, bounds, sentiment spread, prompts."""

import re

import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax.testbed import corpus

_SIA = SentimentIntensityAnalyzer()
_BOOSTERS = ("very", "extremely", "really", "so", "quite", "incredibly", "absolutely",
             "totally", "utterly", "thoroughly", "deeply")


@pytest.fixture(scope="module")
def reviews():
  return corpus.generate_reviews(seed=0, n=2000)


def vader(texts):
  return np.array([_SIA.polarity_scores(t)["compound"] for t in texts])


def test_deterministic_from_seed():
  a = corpus.generate_reviews(7, 500)
  b = corpus.generate_reviews(7, 500)
  c = corpus.generate_reviews(8, 500)
  assert "\n".join(a).encode() == "\n".join(b).encode()
  assert sum(x != y for x, y in zip(a, c)) > 400


def test_no_global_rng_state():
  import random  # pylint: disable=g-import-not-at-top
  random.seed(1)
  np.random.seed(1)
  a = corpus.generate_reviews(3, 50)
  random.seed(2)
  np.random.seed(2)
  assert corpus.generate_reviews(3, 50) == a


def test_sizes_and_length_bounds(reviews):
  assert len(reviews) == 2000
  lengths = np.array([len(r.encode()) for r in reviews])
  assert all(r.isascii() for r in reviews)
  assert lengths.max() <= 120  # the default max_chars; the brief's hard max is 160
  assert np.median(lengths) <= 100
  for r in reviews:
    assert r == r.strip() and "  " not in r
    assert len(r.split()) >= 3
    sentences = re.findall(r"[.!](?: |$)", r)
    assert 1 <= len(sentences) <= 4, r
  print(f"\nlength bytes: mean {lengths.mean():.1f} median {np.median(lengths):.0f} "
        f"p95 {np.percentile(lengths, 95):.0f} max {lengths.max()}")


def test_max_chars_is_hard():
  short = corpus.generate_reviews(1, 1000, max_chars=70)
  assert max(len(r) for r in short) <= 70
  with pytest.raises(ValueError, match="max_chars"):
    corpus.generate_reviews(1, 10, max_chars=20)
  with pytest.raises(ValueError, match="n must be"):
    corpus.generate_reviews(1, -1)
  with pytest.raises(ValueError, match="seed"):
    corpus.generate_reviews(1.5, 3)


def test_sentiment_spread(reviews):
  g = vader(reviews)
  # A review is mixed when VADER scores one of its sentences > 0.05 and another < -0.05.
  mixed = 0
  for r in reviews:
    s = vader(re.split(r"(?<=[.!]) ", r))
    mixed += bool(s.max() > 0.05 and s.min() < -0.05)
  print(f"\nVADER on 2000 reviews: mean {g.mean():.3f} std {g.std():.3f} "
        f"|g|>0.5 {np.mean(np.abs(g) > 0.5):.3f} g>0.5 {np.mean(g > 0.5):.3f} "
        f"g<-0.5 {np.mean(g < -0.5):.3f} g==0 {np.mean(g == 0):.3f} "
        f"mixed {mixed / len(reviews):.3f}")
  assert g.std() >= 0.4
  assert -0.2 < g.mean() < 0.3
  assert np.mean(g > 0.5) > 0.15 and np.mean(g < -0.5) > 0.15
  assert np.mean(np.abs(g) <= 0.5) > 0.25
  assert mixed / len(reviews) > 0.15
  assert np.mean(g > 0.8) > 0.03 and np.mean(g < -0.8) > 0.02  # the extremes exist


def test_lexicon_coverage(reviews):
  lexicon = _SIA.lexicon
  words = {w for r in reviews for w in re.findall(r"[a-z']+", r.lower())}
  pos = sorted(w for w in words if lexicon.get(w, 0) > 0)
  neg = sorted(w for w in words if lexicon.get(w, 0) < 0)
  print(f"\nlexicon words used: {len(pos)} positive, {len(neg)} negative, "
        f"{len(words)} distinct words")
  assert len(pos) >= 40 and len(neg) >= 40


def test_negations_and_intensifiers_occur(reviews):
  negated = np.mean([bool(re.search(r"\b(not|never|n't)\b|n't ", r)) for r in reviews])
  boosted = np.mean([any(f" {b} " in f" {r.lower()} " for b in _BOOSTERS) for r in reviews])
  exclaimed = np.mean(["!" in r for r in reviews])
  assert negated > 0.05 and boosted > 0.15 and exclaimed > 0.1
  # VADER reverses a negated adjective: the grammar relies on that for polarity.
  assert vader(["The plot is not good."])[0] < 0 < vader(["The plot is not bad."])[0]
  assert vader(["The plot is very good."])[0] > vader(["The plot is good."])[0]


def test_corpus_splits():
  splits = corpus.corpus_splits(0, num_train=20_000, num_test=1000)
  assert sorted(splits) == ["test", "train"]
  assert len(splits["train"]) == 20_000 and len(splits["test"]) == 1000
  again = corpus.corpus_splits(0, num_train=20_000, num_test=1000)
  assert again == splits
  # Independent streams: test is not a prefix or copy of train, nor of generate_reviews(0).
  assert splits["test"] != splits["train"][:1000]
  assert splits["test"] != corpus.generate_reviews(0, 1000)
  assert corpus.corpus_splits(1, 100, 100)["test"] != corpus.corpus_splits(0, 100, 100)["test"]
  overlap = corpus.split_overlap(splits["train"], splits["test"])
  print(f"\ntest reviews also in train (20k): {overlap:.3f}")
  assert overlap < 0.15  # only short reviews recur
  assert corpus.split_overlap(["a b c"], ["a b c", "d e f"]) == 0.5


def test_prompts_are_word_prefixes(reviews):
  prompts = corpus.prompts_from_reviews(reviews, seed=3)
  assert len(prompts) == len(reviews)
  counts = []
  for p, r in zip(prompts, reviews):
    assert r.startswith(p) and len(p) < len(r)
    assert r[len(p)] == " "  # cut at a word boundary
    k = len(p.split(" "))
    assert 2 <= k <= 8
    assert k < len(r.split(" "))
    counts.append(k)
  assert set(counts) == set(range(2, 9))
  assert corpus.prompts_from_reviews(reviews, seed=3) == prompts
  assert corpus.prompts_from_reviews(reviews, seed=4) != prompts
  long_reviews = [r for r in reviews if len(r.split(" ")) > 5]
  custom = corpus.prompts_from_reviews(long_reviews, seed=3, min_words=4, max_words=5)
  assert {len(p.split(" ")) for p in custom} == {4, 5}


def test_prompts_hand_example():
  review = "The plot is very good. I loved it."
  prompts = corpus.prompts_from_reviews([review] * 200, seed=0)
  assert set(prompts) == {"The plot", "The plot is", "The plot is very",
                          "The plot is very good.", "The plot is very good. I",
                          "The plot is very good. I loved"}  # never all 8 words


def test_prompt_errors():
  with pytest.raises(ValueError, match=r"reviews\[1\] has 2 words"):
    corpus.prompts_from_reviews(["a b c", "a b"], seed=0)
  with pytest.raises(ValueError, match="min_words"):
    corpus.prompts_from_reviews(["a b c"], seed=0, min_words=5, max_words=3)
  with pytest.raises(ValueError, match=r"reviews\[0\]"):
    corpus.demonstrations([b"a b c"], seed=0)
  with pytest.raises(ValueError, match="single spaces"):
    corpus.demonstrations(["a  b c"], seed=0)


def test_demonstrations(reviews):
  demos = corpus.demonstrations(reviews, seed=5)
  prompts = corpus.prompts_from_reviews(reviews, seed=5)
  assert [d["prompt"] for d in demos] == prompts
  for d, r in zip(demos, reviews):
    assert set(d) == {"prompt", "response"}
    assert d["prompt"] + d["response"] == r
    assert d["response"].startswith(" ") and len(d["response"]) > 1
