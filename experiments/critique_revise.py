r"""Critique and revision (SL-CAI, Bai et al. 2022): SFT data from a model's own revisions.

  python -m experiments.critique_revise --model=runs/sft --out=runs/revisions \
      --constitution=configs/constitutions/sentiment_reviews.json --num_prompts=2000 \
      --rounds=1 --principles=sample

For each prompt the model (an rlhf_jax run's workdir or a Hugging Face directory)
samples a response, critiques it under a principle and revises it (`--rounds` times;
see rlhf_jax/feedback/revision.py). Prompts: the first `--num_prompts` of the run's
prompt split (`--split`) and `--num_test_prompts` held-out ones, or a JSONL file of
{"prompt": ...} lines (`--prompts`, the first num_prompts for train, the next
num_test_prompts for test). Writes a demonstration dataset of (prompt, final revision)
pairs, with `revisions-<split>.jsonl` (response, critiques, revisions) beside its files,
and prints it, for SFT on the revisions:

  python -m experiments.train --config=configs/sft_revisions.py --workdir=runs/sl_cai \
      --config.init.checkpoint=runs/sft --config.data.dataset_dir=<printed dir>

The dataset is a function of the model checkpoint and the flags (same seed, same files).
"""

import json
import os
import sys

from absl import app
from absl import flags

from experiments import common
from rlhf_jax.data import jsonl
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import models
from rlhf_jax.feedback import revision
from rlhf_jax.testbed import policy as policy_lib

DEFAULT_CONSTITUTION = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "configs", "constitutions", "sentiment_reviews.json")

_MODEL = flags.DEFINE_string("model", None, "The model that answers, critiques and revises: "
                             "an rlhf_jax run's workdir or a Hugging Face directory.")
_OUT = flags.DEFINE_string("out", None, "Directory that holds prepared datasets.")
_CONSTITUTION = flags.DEFINE_string("constitution", DEFAULT_CONSTITUTION, "Constitution file.")
_PRINCIPLES = flags.DEFINE_string("principles", "sample", "'sample' (one per prompt and "
                                  "round), 'all' (round r: principle r mod P) or a name.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Critique-revision rounds per prompt.")
_PROMPTS = flags.DEFINE_string("prompts", "", "JSONL file of {\"prompt\": ...} lines; '' takes "
                               "the run's own prompts (--model must then be a run).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 1000, "Prompts for the train split.")
_NUM_TEST_PROMPTS = flags.DEFINE_integer("num_test_prompts", 200, "Prompts for the test split.")
_SPLIT = flags.DEFINE_string("split", "train", "The run's prompt split the train prompts "
                             "come from (test prompts are always held out).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where the run's prompt dataset is prepared; "
                                "'' means its config's data.data_dir or <run>/data.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds sampling and the principles drawn.")
_FORMAT = flags.DEFINE_enum("prompt_format", "auto", ["auto", "plain", "chat"],
                            "auto: chat when the model has a chat template.")
_CHAT_TEMPLATE = flags.DEFINE_string("chat_template", "", "A Jinja chat template file that "
                                     "replaces the model's own.")
_RESPONSE_TOKENS = flags.DEFINE_integer("response_tokens", 48, "Tokens of the first response.")
_CRITIQUE_TOKENS = flags.DEFINE_integer("critique_tokens", 48, "Tokens of a critique.")
_REVISION_TOKENS = flags.DEFINE_integer("revision_tokens", 48, "Tokens of a revision.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k sampling, 0: off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass, 1: off.")
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding.")
_STOP = flags.DEFINE_list("stop", [], "Strings that end a critique or revision (JSON escapes "
                          "allowed, e.g. \\n).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts per sampling call.")
_BUCKET = flags.DEFINE_integer("bucket", 32, "Prompts are padded to a multiple of this many "
                               "tokens (one compile per length).")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "HF model: context length (default "
                                "max_position_embeddings).")
flags.mark_flags_as_required(["model", "out"])


def _read_prompts(path: str, count: int) -> list[str]:
  def parse(obj):
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
      raise jsonl.RecordError("expected a non-empty string under key 'prompt'")
    return [prompt]
  prompts = [p for p in jsonl.read_jsonl(path, parse)]
  if len(prompts) < count:
    raise ValueError(f"--prompts={path!r} has {len(prompts)} prompts, --num_prompts + "
                     f"--num_test_prompts = {count}")
  return prompts[:count]


def prompt_sets(model_path: str, lm: models.LanguageModel, prompts_file: str, num_prompts: int,
                num_test_prompts: int, split: str, data_dir: str) -> dict[str, list[str]]:
  """{'train', 'test'} prompts, from the JSONL file or from the run's prompt dataset."""
  if num_prompts < 1 or num_test_prompts < 1:
    raise ValueError(f"--num_prompts ({num_prompts}) and --num_test_prompts "
                     f"({num_test_prompts}) must be >= 1")
  if prompts_file:
    prompts = _read_prompts(prompts_file, num_prompts + num_test_prompts)
    return {"train": prompts[:num_prompts], "test": prompts[num_prompts:]}
  if lm.kind != "run":
    raise ValueError(f"--model={model_path!r} is a Hugging Face directory: pass --prompts")
  if split not in ("train", "test"):
    raise ValueError(f"--split must be 'train' or 'test', got {split!r}")
  config = policy_lib.read_config(model_path)
  data_dir = data_dir or config.data.data_dir or os.path.join(model_path, "data")
  return {"train": policy_lib.heldout_prompts(config, data_dir, split, num_prompts),
          "test": policy_lib.heldout_prompts(config, data_dir, "test", num_test_prompts,
                                             start=num_prompts if split == "test" else 0)}


def main(argv):
  del argv
  common.quiet_logging()
  try:
    constitution = constitution_lib.load(_CONSTITUTION.value)
    revision.round_principles(constitution, 1, _ROUNDS.value, _PRINCIPLES.value, 0)  # checks
    lm = models.load(_MODEL.value, chat_template_file=_CHAT_TEMPLATE.value,
                     max_len=_MAX_LEN.value)
    fmt = constitution_lib.make_format(constitution, _FORMAT.value, lm.chat_template,
                                       lm.special_tokens)
    sets = prompt_sets(_MODEL.value, lm, _PROMPTS.value, _NUM_PROMPTS.value,
                       _NUM_TEST_PROMPTS.value, _SPLIT.value, _DATA_DIR.value)
    stop = [json.loads(f'"{s}"') for s in _STOP.value]
    options = dict(rounds=_ROUNDS.value, principles=_PRINCIPLES.value,
                   response_tokens=_RESPONSE_TOKENS.value, critique_tokens=_CRITIQUE_TOKENS.value,
                   revision_tokens=_REVISION_TOKENS.value, temperature=_TEMPERATURE.value,
                   top_k=_TOP_K.value, top_p=_TOP_P.value, greedy=_GREEDY.value,
                   batch_size=_BATCH.value, bucket=_BUCKET.value, stop=stop)
    prompts = {"file": os.path.abspath(_PROMPTS.value) if _PROMPTS.value else "",
               "split": _SPLIT.value, "num_prompts": _NUM_PROMPTS.value,
               "num_test_prompts": _NUM_TEST_PROMPTS.value}
    dataset_dir, stats = revision.make_dataset(lm, constitution, fmt, sets, _OUT.value,
                                               seed=_SEED.value, settings={"prompts": prompts},
                                               **options)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"critique_revise: error: {e}")
  for name in sets:
    print(f"{name}: {stats[f'{name}_prompts']} prompts, {stats[f'{name}_kept']} revisions kept, "
          f"{stats[f'{name}_changed_rate']:.1%} changed the response; mean length "
          f"{stats[f'{name}_response_chars']:.0f} -> {stats[f'{name}_revision_chars']:.0f} chars")
  print(f"wrote {dataset_dir} (records: {dataset_dir}/revisions-<split>.jsonl)")
  print(f"use: --config=configs/sft_revisions.py --config.data.dataset_dir={dataset_dir}")


if __name__ == "__main__":
  app.run(main)
