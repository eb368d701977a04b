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
"""

import sys

from absl import app
from absl import flags

from experiments import common
from rlhf_jax.testbed.labelling import label

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
flags.mark_flags_as_required(["policy", "out"])


def main(argv):
  del argv
  common.quiet_logging()
  try:
    dataset_dir = label(
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
