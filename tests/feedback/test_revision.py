"""Critique and revision (SL-CAI) on a tiny random model: greedy outputs equal an
independent greedy decode of the hand-written templates; the records, the demonstration
dataset and the JSONL are well formed."""

import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax.data import tfds_builders
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import revision
from rlhf_jax.tokenizers import ByteTokenizer
from tests.feedback import tiny
from tests.feedback.test_constitution import DEFAULT

PROMPTS = ["The film", "Honestly, the acting was", "I"]
LENGTHS = dict(response_tokens=6, critique_tokens=5, revision_tokens=7)


@pytest.fixture(scope="module")
def setup():
  lm = tiny.byte_lm(seed=2)
  c = constitution_lib.load(DEFAULT)
  fmt = constitution_lib.make_format(c, "plain")
  records = revision.critique_and_revise(lm, c, fmt, PROMPTS, jax.random.key(0), rounds=2,
                                         principles="all", greedy=True, batch_size=2,
                                         bucket=64, **LENGTHS)
  return lm, c, records


def greedy(lm, text, max_new):
  """Argmax decoding by full forward passes (no cache, no sampler), stopping at EOS."""
  ids, new = tiny.byte_ids(text), []
  for _ in range(max_new):
    token = int(np.argmax(tiny.full_forward_last_logits(lm.model, lm.params, ids + new,
                                                        length=512)))
    new.append(token)
    if token == ByteTokenizer.eos_id:
      break
  return ByteTokenizer().decode(new)


def test_greedy_loop_equals_hand_written_templates(setup):
  lm, c, records = setup
  record = records[1]
  prompt = PROMPTS[1]
  assert record["prompt"] == prompt
  response = greedy(lm, prompt, LENGTHS["response_tokens"])
  assert record["response"] == response
  for r, principle in enumerate(c.principles):        # 'all': round r uses principle r
    step = record["rounds"][r]
    assert step["principle"] == principle.name
    critique = greedy(lm, f"Review: {prompt}{response}\nCritique request: "
                      f"{principle.critique_request}\nCritique:", LENGTHS["critique_tokens"])
    assert step["critique"] == critique
    revised = greedy(lm, f"Review: {prompt}{response}\nCritique request: "
                     f"{principle.critique_request}\nCritique:{critique}\nRevision request: "
                     f"{principle.revision_request}\nRevision: {prompt}",
                     LENGTHS["revision_tokens"])
    assert step["revision"] == revised
    response = revised
  assert record["revision"] == response


def test_records_dataset_and_jsonl(setup, tmp_path):
  _, _, records = setup
  for r in records:
    assert set(r) == {"prompt", "response", "rounds", "revision"} and len(r["rounds"]) == 2
    assert [s["principle"] for s in r["rounds"]] == ["harmless", "helpful"]
  records = records + [dict(records[0], revision=" ")]          # an empty revision is dropped
  dataset_dir, stats = revision.write_dataset(str(tmp_path), "revisions-test",
                                              {"train": records, "test": records[:1]},
                                              {"source": "test"})
  assert stats["train_prompts"] == 4 and stats["train_kept"] + stats["train_empty_revisions"] == 4
  kept = [r for r in records if r["revision"].strip()]
  splits = tfds_builders.load(dataset_dir, kind="demonstration")
  assert [splits["train"][i] for i in range(len(splits["train"]))] == [
      {"prompt": r["prompt"], "response": r["revision"]} for r in kept]
  with open(os.path.join(dataset_dir, "revisions-train.jsonl")) as f:
    assert [json.loads(line) for line in f] == records
  assert tfds_builders.read_metadata(dataset_dir)["stats"] == stats


def test_round_principles():
  c = constitution_lib.load(DEFAULT)
  np.testing.assert_array_equal(revision.round_principles(c, 2, 3, "all", 0),
                                [[0, 0], [1, 1], [0, 0]])
  np.testing.assert_array_equal(revision.round_principles(c, 2, 1, "helpful", 0), [[1, 1]])
  drawn = revision.round_principles(c, 50, 2, "sample", 7)
  assert drawn.shape == (2, 50) and set(drawn.ravel()) == {0, 1}
  with pytest.raises(ValueError, match="rounds must be >= 1"):
    revision.round_principles(c, 2, 0, "all", 0)


def test_given_responses_are_critiqued_and_revised_as_if_sampled(setup):
  """Responses written by another model go through the same critique and revision calls:
  given the responses the loop sampled itself, every record is the same."""
  lm, c, records = setup
  given = revision.critique_and_revise(
      lm, c, constitution_lib.make_format(c, "plain"), PROMPTS, jax.random.key(0), rounds=2,
      principles="all", greedy=True, batch_size=2, bucket=64,
      responses=[r["response"] for r in records], **LENGTHS)
  assert given == records
  other = ["x", " was dull.", " liked it"]
  moved = revision.critique_and_revise(
      lm, c, constitution_lib.make_format(c, "plain"), PROMPTS, jax.random.key(0), rounds=1,
      principles="all", greedy=True, batch_size=2, bucket=64, responses=other, **LENGTHS)
  assert [r["response"] for r in moved] == other
  with pytest.raises(ValueError, match="2 responses for 3 prompts"):
    revision.critique_and_revise(lm, c, constitution_lib.make_format(c, "plain"), PROMPTS,
                                 jax.random.key(0), responses=other[:2], **LENGTHS)
