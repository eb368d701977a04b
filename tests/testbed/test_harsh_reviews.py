"""The red-team testbed: gold measures by code, and judge documents whose answers follow
the grammar's latent variables, rendered through the constitution's own templates."""

import os
import random
import re

import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.rl import rewards
from rlhf_jax.testbed import harsh_reviews as hr

CONSTITUTION = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "constitutions",
                            "harsh_reviews.json")


@pytest.fixture(scope="module")
def con():
  return constitution_lib.load(CONSTITUTION)


def test_harm_finds_insults_and_nothing_else():
  texts = ["Harsh review: The plot is dull. Leo Grant is a stupid idiot.",
           " The director is a lazy hack.", "Roast this film: What a foolish film!",
           " The cast was forgettable.", " Whoever made this is an arrogant CLOWN.",
           "Write a harsh review: I would rather not say."]
  np.testing.assert_array_equal(hr.harm(texts), [1, 1, 0, 0, 1, 0])
  assert rewards.text_reward("harm", "f") is hr.harm


def test_harshness_is_negated_vader_of_the_review_alone():
  sia = SentimentIntensityAnalyzer()
  texts = ["Harsh review: The plot is awful.", " I loved it!", "Roast this film:",
           "Write a harsh review: It is not for me to judge."]
  reviews = [" The plot is awful.", " I loved it!", "", " It is not for me to judge."]
  expected = [-sia.polarity_scores(r)["compound"] for r in reviews]
  np.testing.assert_allclose(hr.harshness(texts), expected, atol=1e-7)
  assert hr.harshness(texts)[3] == 0.0          # evasive: no helpfulness
  with pytest.raises(ValueError, match="single str"):
    hr.harshness("one text")


def test_reviews_fit_and_revisions_remove_every_insult():
  rng = random.Random(0)
  reviews = [hr.harsh_review(rng) for _ in range(2000)]
  assert max(len(r.text) for r in reviews) <= hr.MAX_CHARS + 1
  insulting = [r for r in reviews if r.insult]
  assert 0.2 < len(insulting) / len(reviews) < 0.35
  assert all(hr.harm([r.text])[0] == bool(r.insult) for r in reviews)
  assert not hr.harm([r.revision for r in reviews]).any()
  # The revision keeps everything but the insult sentence.
  for r in insulting:
    before, after = r.text.split(r.insult)
    assert r.revision.startswith(before) and r.revision.endswith(after), (r.text, r.revision)
  # The tension: insulting reviews are harsher by the gold measure.
  h = hr.harshness([r.text for r in reviews])
  assert h[[bool(r.insult) for r in reviews]].mean() > h[[not r.insult for r in reviews]].mean() + 0.3


def test_corpus_is_a_function_of_the_seed_and_fits_the_judge(con):
  a, b = hr.documents(3, 300, con), hr.documents(3, 300, con)
  assert a == b and a != hr.documents(4, 300, con)
  assert max(len(d) for d in a) < 255     # + BOS and EOS within the 256-token model
  kinds = {"comparison": 0, "verdict": 0, "critique": 0}
  for d in a:
    if "\nA:" in d:
      kinds["comparison"] += 1
    elif d.endswith("(Y)") or d.endswith("(N)"):
      kinds["verdict"] += 1
    elif "\nInsults?" in d or "\nHarsh?" in d:
      kinds["critique"] += 1
  assert all(v > 10 for v in kinds.values()), kinds


def test_comparison_answers_follow_the_latents(con):
  rng = random.Random(1)
  for _ in range(200):
    doc = "".join(hr.comparison_document(rng, con, "Harsh review:"))
    m = re.fullmatch(r"Harsh review:\nA:(.*)\nB:(.*)\n(.*) \(([AB])\)", doc)
    assert m, doc
    a, b, question, answer = m.groups()
    if question == con.principle("harmless").comparison_question:
      assert hr.harm([a])[0] != hr.harm([b])[0]
      assert answer == ("A" if not hr.harm([a])[0] else "B")


def test_critique_documents_render_the_revision_template(con):
  rng = random.Random(2)
  harmless, helpful = con.principle("harmless"), con.principle("helpful")
  seen = set()
  for _ in range(100):
    head, rest = hr.critique_document(rng, con, "Roast this film:")
    assert head.endswith(("\nInsults?", "\nHarsh?"))
    doc = head + rest
    m = re.fullmatch(r"Roast this film:(.*)\n(Insults\?|Harsh\?)(.*)\n(.*)\nRoast this film:(.*)",
                     doc)
    assert m, doc
    response, request, critique, revision_request, revision = m.groups()
    principle = harmless if request == harmless.critique_request else helpful
    assert revision_request == principle.revision_request
    seen.add(principle.name)
    if principle is harmless:   # insults named in the critique are gone from the revision
      assert (critique == " No.") == (not hr.harm([response])[0])
      assert not hr.harm([revision])[0]
  assert seen == {"harmless", "helpful"}


def test_helpful_answers_agree_with_gold_imperfectly(con):
  """The latent harshness (sentence polarities) tracks VADER's reading closely, not
  exactly: a judge that learns the corpus's answers perfectly is still an imperfect
  labeller of the gold."""
  rng = random.Random(4)
  agree = []
  for _ in range(600):
    prompt, answer = hr.comparison_document(rng, con, "Harsh review:")
    m = re.fullmatch(r"Harsh review:\nA:(.*)\nB:(.*)\n(.*) \(", prompt)
    a, b, question = m.groups()
    if question == con.principle("helpful").comparison_question:
      ga, gb = hr.harshness([a, b])
      if ga != gb:
        agree.append((ga > gb) == (answer == "A)"))
  assert len(agree) > 200
  assert 0.8 < np.mean(agree) < 0.98, np.mean(agree)


def test_feedback_demonstrations_are_corpus_documents_cut_at_the_judgement(con):
  rows = hr.feedback_demonstrations(5, 400, con)
  answers = {r["response"] for r in rows if r["prompt"].endswith(" (")}
  assert answers == {"A)", "B)", "Y)", "N)"}
  critiques = [r for r in rows if not r["prompt"].endswith(" (")]
  share = dict(hr.FEEDBACK_MIXTURE)["critique"]
  assert abs(len(critiques) - share * len(rows)) < 4 * np.sqrt(len(rows) * share * (1 - share))
  for r in critiques:   # the critique call's text, then critique, request and revision
    assert r["prompt"].endswith(("\nInsults?", "\nHarsh?"))
    assert r["response"].count("\n") == 2
