r"""Evaluates a policy on held-out testbed prompts: gold reward, KL to a reference, diversity.

  python -m experiments.evaluate_policy --policy=/tmp/dpo --reference=/tmp/sft \
      --num_prompts=256 --out=/tmp/dpo/eval.json

One response per prompt (sampling options default to the policy config's `sampling`
block); gold reward of prompt + response; Monte-Carlo KL(policy || reference) over the
sampled responses. Prints a short table and writes the JSON of
`rlhf_jax.testbed.policy.evaluate_policy`. `--prompt=unconditional` samples whole
reviews after BOS alone (a pretrained model's samples, comparable with the corpus).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax

from experiments import common
from rlhf_jax.stages import common as stage_common
from rlhf_jax.testbed import policy as policy_lib

_POLICY = flags.DEFINE_string("policy", None, "Workdir of the policy run.")
_REFERENCE = flags.DEFINE_string("reference", "", "Workdir of the reference run; '' skips the KL.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None, "Held-out prompts (default: "
                                    "sampling.eval_prompts).")
_OUT = flags.DEFINE_string("out", "", "JSON file to write; '' only prints.")
_PROMPTS_FROM = flags.DEFINE_string(
    "prompts_from", "", "Run whose config names the prompt data; '' means the policy's, or the "
    "reference's when the policy trained on preference pairs (a DPO or reward run).")
_SPLIT = flags.DEFINE_string("split", "test", "Prompt split ('test': prefixes of held-out reviews).")
_PROMPT = flags.DEFINE_enum("prompt", "heldout", ["heldout", "unconditional"],
                            "heldout: review prefixes; unconditional: BOS only.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Where the prompt dataset is prepared; '' means "
                                "the policy config's data.data_dir or <policy>/data.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "default: sampling.max_new_tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "default: sampling.temperature.")
_TOP_K = flags.DEFINE_integer("top_k", None, "default: sampling.top_k.")
_TOP_P = flags.DEFINE_float("top_p", None, "default: sampling.top_p.")
_BATCH = flags.DEFINE_integer("batch_size", None, "default: sampling.eval_batch_size.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Samples kept in the JSON.")
flags.mark_flags_as_required(["policy"])


PAIR_STAGES = ("dpo", "reward")   # stages whose data are preference pairs, not prompts


def prompts_run(policy_path: str, reference_path: str = "", prompts_from: str = "") -> str:
  """The run whose config gives the held-out prompts (see --prompts_from)."""
  if prompts_from:
    return prompts_from
  stage = policy_lib.read_config(policy_path).get("stage")
  if stage in PAIR_STAGES:
    if not reference_path:
      raise ValueError(f"{policy_path}: a {stage} run has preference pairs, not prompts; pass "
                       "--reference or --prompts_from")
    return reference_path
  return policy_path


def evaluate(policy_path: str, reference_path: str = "", *, num_prompts: int | None = None,
             prompts_from: str = "", split: str = "test", unconditional: bool = False, seed: int = 0,
             data_dir: str = "", num_samples: int = 4, **sampling) -> dict:
  """`policy_lib.evaluate_policy` on checkpoints; sampling options None -> the config's."""
  for flag, path in (("--policy", policy_path), ("--reference", reference_path),
                     ("--prompts_from", prompts_from)):
    if path and not os.path.isdir(path):
      raise FileNotFoundError(f"{flag}={path!r}: no such run (expected a run's workdir)")
  config = policy_lib.read_config(policy_path)
  options = policy_lib.sampling_options(config)
  num_prompts = num_prompts or options["eval_prompts"]
  options = dict(max_new_tokens=options["max_new_tokens"], temperature=options["temperature"],
                 top_k=options["top_k"], top_p=options["top_p"],
                 batch_size=options["eval_batch_size"])
  options.update({k: v for k, v in sampling.items() if v is not None})
  if unconditional:
    prompts, prompt_len = [""] * num_prompts, 1
  else:
    source = prompts_run(policy_path, reference_path, prompts_from)
    prompt_config = policy_lib.read_config(source)
    prompt_len = prompt_config.data.prompt_len
    prompts = policy_lib.heldout_prompts(
        prompt_config, data_dir or stage_common.data_dir(prompt_config, source), split, num_prompts)
  _, model, params = policy_lib.load_policy(policy_path)
  reference = None
  if reference_path:
    _, ref_model, ref_params = policy_lib.load_policy(reference_path)
    reference = (ref_model, ref_params)
  start = time.perf_counter()
  result = policy_lib.evaluate_policy(
      (model, params), reference, prompts, policy_lib.make_tokenizer(config),
      jax.random.key(seed), prompt_len=prompt_len, num_samples=num_samples, **options)
  result.update(policy=os.path.abspath(policy_path),
                reference=os.path.abspath(reference_path) if reference_path else None,
                prompts="unconditional" if unconditional else split, seed=seed,
                seconds=time.perf_counter() - start)
  return result


def format_table(result: dict) -> str:
  def fmt(value, err=None):
    if value is None:
      return "-"
    return f"{value:.4f}" + (f" +- {err:.4f}" if err is not None else "")
  rows = [("prompts", str(result["num"])),
          ("gold reward", fmt(result["gold_mean"], result["gold_stderr"])),
          ("gold std", fmt(result["gold_std"])),
          ("KL(policy || ref)", fmt(result["kl"], result["kl_stderr"])),
          ("length (tokens)", fmt(result["length_mean"])),
          ("distinct-1 / -2", f"{result['distinct_1']:.3f} / {result['distinct_2']:.3f}")]
  lines = [f"{name:<20} {value}" for name, value in rows]
  lines += [f"  {s['prompt']!r} -> {s['response']!r} (gold {s['gold']:.3f})"
            for s in result["samples"]]
  return "\n".join(lines)


def main(argv):
  del argv
  common.quiet_logging()
  try:
    result = evaluate(
        _POLICY.value, _REFERENCE.value, num_prompts=_NUM_PROMPTS.value,
        prompts_from=_PROMPTS_FROM.value, split=_SPLIT.value,
        unconditional=_PROMPT.value == "unconditional", seed=_SEED.value,
        data_dir=_DATA_DIR.value, num_samples=_NUM_SAMPLES.value,
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, batch_size=_BATCH.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"evaluate_policy: error: {e}")
  print(format_table(result))
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
