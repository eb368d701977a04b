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

import hashlib
import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import common
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import judge as judge_lib
from rlhf_jax.feedback import models
from rlhf_jax.testbed import labelling
from rlhf_jax.testbed import policy as policy_lib
from rlhf_jax.testbed.labelling import label
from rlhf_jax.train import checkpoint as checkpoint_lib

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


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def _check_ai_args(k, seed, num_prompts, num_test_prompts, split, out_dir, judge, batch, bucket):
  if not judge:
    raise ValueError("--labeler=ai needs --judge (an rlhf_jax run's workdir or a Hugging "
                     "Face directory)")
  if not isinstance(k, int) or k < 2:
    raise ValueError(f"--k must be an int >= 2 (pairs need two responses), got {k!r}")
  if seed < 0:
    raise ValueError(f"--seed must be >= 0, got {seed}")
  if num_prompts < 1 or num_test_prompts < 1:
    raise ValueError(f"--num_prompts ({num_prompts}) and --num_test_prompts "
                     f"({num_test_prompts}) must be >= 1")
  if split not in ("train", "test"):
    raise ValueError(f"--split must be 'train' or 'test', got {split!r}")
  if batch < 1 or bucket < 1:
    raise ValueError(f"--judge_batch_size ({batch}) and --judge_bucket ({bucket}) must be >= 1")
  if os.path.isfile(os.path.join(out_dir, "metadata.json")):
    raise ValueError(f"--out={out_dir!r} is a prepared dataset; pass a directory to hold "
                     "datasets (written to <out>/preference/<name>/1.0.0)")


def label_ai(policy_path: str, out_dir: str, judge_path: str, constitution_path: str, *,
             k: int = 4, num_prompts: int = 1000, num_test_prompts: int = 200, seed: int = 0,
             pairs_per_prompt="all", split: str = "train", principles: str = "sample",
             prompt_format: str = "auto", chat_template: str = "", judge_batch_size: int = 16,
             judge_bucket: int = 32, judge_max_len: int | None = None,
             max_new_tokens: int | None = None, sample_temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None,
             batch_size: int | None = None, data_dir: str = "", score_fn=None,
             verbose: bool = False) -> str:
  """Samples like `labelling.label` (same seed: same responses), labels the pairs with the
  judge; returns the preference dataset's directory. Errors are raised before sampling."""
  score_fn = score_fn or policy_lib.gold_scores
  pairs = labelling.parse_pairs_per_prompt(pairs_per_prompt)
  _check_ai_args(k, seed, num_prompts, num_test_prompts, split, out_dir, judge_path,
                 judge_batch_size, judge_bucket)
  if isinstance(pairs, int) and pairs > k * (k - 1) // 2:
    raise ValueError(f"--pairs_per_prompt={pairs} exceeds the k(k-1)/2={k * (k - 1) // 2} "
                     f"pairs of k={k} responses")
  constitution = constitution_lib.load(constitution_path)
  constitution_lib.choose_principles(constitution, 0, principles, 0)    # checks the name
  config = policy_lib.read_config(policy_path)
  checkpoint_lib.checkpoint_dir(policy_path)
  judge = models.load(judge_path, chat_template_file=chat_template, max_len=judge_max_len)
  fmt = constitution_lib.make_format(constitution, prompt_format, judge.chat_template,
                                     judge.special_tokens)
  judge_lib.option_token_ids(judge, constitution.options, f"{constitution.path}: field options")

  _, model, params = policy_lib.load_policy(policy_path)
  tokenizer = policy_lib.make_tokenizer(config)
  defaults = policy_lib.sampling_options(config)
  defaults["batch_size"] = defaults.pop("eval_batch_size")
  given = dict(max_new_tokens=max_new_tokens, temperature=sample_temperature, top_k=top_k,
               top_p=top_p, batch_size=batch_size)
  sample = {key: defaults[key] if value is None else value for key, value in given.items()}
  sample["prompt_len"] = config.data.prompt_len
  data_dir = data_dir or config.data.data_dir or os.path.join(policy_path, "data")
  _, step = checkpoint_lib.checkpoint_dir(policy_path)
  test_start = num_prompts if split == "test" else 0
  prompt_sets = {
      "train": policy_lib.heldout_prompts(config, data_dir, split, num_prompts),
      "test": policy_lib.heldout_prompts(config, data_dir, "test", num_test_prompts,
                                         start=test_start),
  }
  root = jax.random.key(seed)
  records, rows, stats = {}, {}, {}
  for index, name in enumerate(("train", "test")):
    prompts = prompt_sets[name]
    repeated = [p for p in prompts for _ in range(k)]
    out = policy_lib.generate(model, params, repeated, tokenizer,
                              jax.random.fold_in(root, index), **sample)
    scores = np.asarray(score_fn(repeated, out["texts"]), np.float64).reshape(len(prompts), k)
    responses = [out["texts"][i * k:(i + 1) * k] for i in range(len(prompts))]
    start = time.monotonic()
    records[name], rows[name], split_stats = judge_lib.label_responses(
        judge, constitution, fmt, prompts, responses, scores=scores, pairs_per_prompt=pairs,
        principles=principles, seed=2 * seed + index, batch_size=judge_batch_size,
        bucket=judge_bucket, progress_every_s=10.0 if verbose else None)
    if not records[name]:
      raise ValueError(f"{name} split: every one of {split_stats['pairs']} pairs is a tie")
    stats.update({f"{name}_{key}": v for key, v in split_stats.items()})
    stats[f"{name}_prompts"] = len(prompts)
    if verbose:
      s = split_stats
      rate = s["pairs"] / max(time.monotonic() - start, 1e-9)
      print(f"{name}: {len(prompts)} prompts x {k} responses, {s['pairs']} pairs judged "
            f"({rate:.1f} pairs/s), {s['labelled']} labelled, agreement with gold "
            f"{s['agreement_rate']:.3f} (on {s['gold_decided']} pairs whose gold differs); "
            f"position bias before {s['position_bias_before']:+.3f} "
            f"(first shown wins {s['first_wins_rate']:.1%}, order consistency "
            f"{s['order_consistency']:.1%}), after {s['position_bias_after']:.1e} "
            f"(pair's first chosen {s['first_chosen_rate']:.1%})")
      for principle, agreement in s.get("principle_agreement", {}).items():
        print(f"  {principle}: agreement with gold {agreement['agreement_rate']:.3f} on "
              f"{agreement['pairs']} pairs")

  settings = {
      "policy": os.path.abspath(policy_path), "checkpoint_step": step,
      "labeller": {"k": k, "pairs_per_prompt": pairs, "seed": seed, "principles": principles,
                   "prompt_format": fmt.kind, "chat_template": _digest(fmt.chat_template),
                   "judge": judge.source, "judge_kind": judge.kind,
                   "constitution": constitution.describe()},
      "prompts": {"split": split, "num_prompts": num_prompts,
                  "num_test_prompts": num_test_prompts, "test_start": test_start},
      "sampling": sample,
      "gold": f"{score_fn.__module__}.{score_fn.__qualname__}",
  }
  if judge.kind == "run":
    settings["labeller"]["judge_checkpoint_step"] = checkpoint_lib.checkpoint_dir(judge_path)[1]
  return judge_lib.write_dataset(out_dir, f"ai-{_digest(settings)}", records, rows,
                                 dict(settings, source="ai", stats=stats), with_scores=True)



def _label_ai():
  return label_ai(
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
