r"""Simulated preference labels: sample k responses per prompt, score, label pairs.

  python -m experiments.label_preferences --policy=/tmp/sft --out=/tmp/labels \
      --k=4 --temperature=0.5 --flip_rate=0 --num_prompts=2000 --seed=0

Samples k responses to each of `num_prompts` train prompts from the policy (a run's
workdir), scores each whole review (prompt + response) with the gold reward (VADER),
labels pairs with `testbed.annotators.label_pairs` (Bradley-Terry annotators at
`--temperature`, labels flipped with `--flip_rate`), and writes a preference dataset
with gold scores under `--out`; a test split comes the same way from held-out prompts.
Prints the dataset directory, for the reward and DPO stages:

  --config.data.source=dataset --config.data.dataset_dir=<printed dir>

The dataset is a function of the policy checkpoint and the flags: the same seed writes
byte-identical array_record files.

AI labels (RLAIF, Lee et al. 2023): the same sampled responses (same seed, same pairs
for 'all' / 'adjacent'), labelled by a judge model under a constitution instead of the
simulated annotators:

  python -m experiments.label_preferences --labeler=ai --policy=/tmp/sft --out=/tmp/labels \
      --judge=RUN_OR_HF_DIR --constitution=configs/constitutions/sentiment_reviews.json \
      --principles=sample --k=4 --num_prompts=2000

Each pair is judged in both orders (position bias printed before and after) under one
principle drawn per pair (`--principles=sample`), all of them averaged (`all`) or a
named one. The dataset has the simulated format (gold scores kept, so agreement with
gold is measured); its `margin` column is the judge's log-odds |log P(a>b) - log P(b>a)|,
sigmoid(margin) = P(chosen > rejected), the soft Bradley-Terry target
(metadata 'margin': 'judge_log_odds'); `judgements-<split>.jsonl` beside the dataset's
files holds every pair's single-order probabilities. See rlhf_jax/feedback/judge.py.
"""

import os
import sys

from absl import app
from absl import flags

from experiments import common
from rlhf_jax.testbed import labelling

DEFAULT_CONSTITUTION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "configs", "constitutions", "sentiment_reviews.json")

_POLICY = flags.DEFINE_string("policy", None, "Workdir of the policy run to sample from.")
_OUT = flags.DEFINE_string("out", None, "Directory that holds prepared datasets.")
_K = flags.DEFINE_integer("k", 4, "Responses sampled per prompt (>= 2).")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.5, "Annotator temperature: P(a > b) = sigmoid((gold_a - gold_b) / T); "
    "0 labels by the sign of the gold difference.")
_FLIP_RATE = flags.DEFINE_float("flip_rate", 0.0, "Probability a label is flipped, in [0, 0.5].")
_PAIRS = flags.DEFINE_string("pairs_per_prompt", "all",
                             "'all' (k(k-1)/2 pairs), 'adjacent' (k-1) or an int.")
_TIE_EPS = flags.DEFINE_float("tie_eps", 0.0, "Pairs whose gold scores differ by at most this "
                              "are ties: counted, not labelled.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 1000, "Prompts for the train pairs.")
_NUM_TEST_PROMPTS = flags.DEFINE_integer("num_test_prompts", 200,
                                         "Held-out prompts for the test pairs.")
_SPLIT = flags.DEFINE_string("split", "train", "Prompt split the train pairs come from.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds sampling and the annotators.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where the prompt dataset is prepared; '' "
                                "means the policy config's data.data_dir or <policy>/data.")
# Sampling flags left unset take the policy config's `sampling` block (configs/base.py).
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Response tokens (default: "
                                "sampling.max_new_tokens).")
_SAMPLE_TEMPERATURE = flags.DEFINE_float("sample_temperature", None, "Policy sampling "
                                         "temperature (default: sampling.temperature).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k sampling, 0: off (default: sampling.top_k).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass, 1: off (default: sampling.top_p).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Prompts per sampling call (default: "
                              "sampling.eval_batch_size).")
# AI labels (--labeler=ai).
_LABELER = flags.DEFINE_enum("labeler", "simulated", ["simulated", "ai"],
                             "simulated: Bradley-Terry annotators on the gold reward; ai: a "
                             "judge model under a constitution (RLAIF).")
_JUDGE = flags.DEFINE_string("judge", None, "--labeler=ai: the judge, an rlhf_jax run's "
                             "workdir or a Hugging Face directory (with tokenizer.json).")
_CONSTITUTION = flags.DEFINE_string("constitution", DEFAULT_CONSTITUTION,
                                    "--labeler=ai: the constitution file (JSON or YAML).")
_PRINCIPLES = flags.DEFINE_string("principles", "sample", "--labeler=ai: 'sample' (one "
                                  "principle per pair, seeded), 'all' (their probabilities "
                                  "averaged) or a principle's name.")
_PROMPT_FORMAT = flags.DEFINE_enum("prompt_format", "auto", ["auto", "plain", "chat"],
                                   "--labeler=ai: how the judge is prompted; auto: chat when "
                                   "the judge has a chat template.")
_CHAT_TEMPLATE = flags.DEFINE_string("chat_template", "", "--labeler=ai: a Jinja chat "
                                     "template file that replaces the judge's own.")
_JUDGE_BATCH = flags.DEFINE_integer("judge_batch_size", 16, "--labeler=ai: judge prompts per "
                                    "forward pass.")
_JUDGE_BUCKET = flags.DEFINE_integer("judge_bucket", 32, "--labeler=ai: judge prompts are "
                                     "padded to a multiple of this many tokens (one compile "
                                     "per length).")
_JUDGE_MAX_LEN = flags.DEFINE_integer("judge_max_len", None, "--labeler=ai, HF judge: context "
                                      "length (default max_position_embeddings).")
flags.mark_flags_as_required(["policy", "out"])

_SIMULATED_ONLY = ("temperature", "flip_rate", "tie_eps")
_AI_ONLY = ("judge", "principles", "prompt_format", "chat_template", "judge_batch_size",
            "judge_bucket", "judge_max_len")


def _label_ai():
  return labelling.label_ai(
      _POLICY.value, _OUT.value, _JUDGE.value, _CONSTITUTION.value, k=_K.value,
      num_prompts=_NUM_PROMPTS.value, num_test_prompts=_NUM_TEST_PROMPTS.value,
      seed=_SEED.value, pairs_per_prompt=_PAIRS.value, split=_SPLIT.value,
      principles=_PRINCIPLES.value, prompt_format=_PROMPT_FORMAT.value,
      chat_template=_CHAT_TEMPLATE.value, judge_batch_size=_JUDGE_BATCH.value,
      judge_bucket=_JUDGE_BUCKET.value, judge_max_len=_JUDGE_MAX_LEN.value,
      max_new_tokens=_MAX_NEW.value, sample_temperature=_SAMPLE_TEMPERATURE.value,
      top_k=_TOP_K.value, top_p=_TOP_P.value, batch_size=_BATCH.value,
      data_dir=_DATA_DIR.value, verbose=True)


def _check_labeler_flags():
  """A flag of the other labeller is an error, not silently ignored."""
  other = _SIMULATED_ONLY if _LABELER.value == "ai" else _AI_ONLY
  given = [name for name in other if flags.FLAGS[name].present]
  if given:
    raise ValueError(f"--{given[0]} does not apply to --labeler={_LABELER.value}")


def main(argv):
  del argv
  common.quiet_logging()
  try:
    _check_labeler_flags()
    if _LABELER.value == "ai":
      dataset_dir = _label_ai()
    else:
      dataset_dir = labelling.label(
          _POLICY.value, _OUT.value, k=_K.value, temperature=_TEMPERATURE.value,
          flip_rate=_FLIP_RATE.value, num_prompts=_NUM_PROMPTS.value,
          num_test_prompts=_NUM_TEST_PROMPTS.value, seed=_SEED.value,
          pairs_per_prompt=_PAIRS.value, split=_SPLIT.value, tie_eps=_TIE_EPS.value,
          max_new_tokens=_MAX_NEW.value, sample_temperature=_SAMPLE_TEMPERATURE.value,
          top_k=_TOP_K.value, top_p=_TOP_P.value, batch_size=_BATCH.value,
          data_dir=_DATA_DIR.value, verbose=True)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"label_preferences: error: {e}")
  print(f"wrote {dataset_dir}")
  print(f"use: --config.data.source=dataset --config.data.dataset_dir={dataset_dir}")


if __name__ == "__main__":
  app.run(main)
