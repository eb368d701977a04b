"""Preference labelling on the testbed: sample k responses per prompt, score them with the
gold reward, label pairs with the simulated annotators (`label`) or an AI judge under a
constitution (`label_ai`), save as a preference dataset.

The dataset is a function of the policy checkpoint and the settings: the same seed
writes byte-identical array_record files. experiments/label_preferences.py is its
command line; the pipeline calls `label` directly.
"""

import glob
import hashlib
import json
import os
import time

import jax
import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import tfds_builders
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import judge as judge_lib
from rlhf_jax.feedback import models as feedback_models
from rlhf_jax.stages import common
from rlhf_jax.testbed import annotators
from rlhf_jax.testbed import policy as policy_lib
from rlhf_jax.train import checkpoint as checkpoint_lib


def parse_pairs_per_prompt(value):
  """'all' | 'adjacent' | a positive int (as int or string) -> label_pairs' argument."""
  if isinstance(value, str) and value in ("all", "adjacent"):
    return value
  try:
    number = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"--pairs_per_prompt must be 'all', 'adjacent' or an int, got {value!r}")
  if number < 1:
    raise ValueError(f"--pairs_per_prompt must be >= 1, got {number}")
  return number


def _dataset_kind(dataset_dir: str) -> str:
  try:
    return tfds_builders.read_metadata(dataset_dir)["kind"]
  except ValueError:
    return "unknown"


def _check_out_dir(out_dir: str) -> None:
  """--out holds preference datasets (<out>/preference/<name>/<version>/): it may not be
  a dataset, be inside one, or hold a dataset of another kind at any level."""
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"--out={out_dir!r} is a file, not a directory")
  path = os.path.abspath(out_dir)
  for _ in range(4):
    if os.path.isfile(os.path.join(path, "metadata.json")):
      raise ValueError(f"--out={out_dir!r} is (inside) a prepared {_dataset_kind(path)!r} "
                       f"dataset at {path}; pass a directory to hold datasets (the preference "
                       "dataset is written to <out>/preference/<name>/1.0.0)")
    path = os.path.dirname(path)
  for pattern in ("*/metadata.json", "*/*/metadata.json", "*/*/*/metadata.json"):
    for found in sorted(glob.glob(os.path.join(out_dir, pattern))):
      kind = _dataset_kind(os.path.dirname(found))
      if kind != "preference":
        raise ValueError(f"--out={out_dir!r} holds a {kind!r} dataset "
                         f"({os.path.dirname(found)}); pass a directory to hold datasets")


def _validate(policy_path, out_dir, k, seed, num_prompts, num_test_prompts, split,
              pairs_per_prompt):
  """Checks what every labeller shares; returns the parsed pairs_per_prompt."""
  if not isinstance(k, int) or k < 2:
    raise ValueError(f"--k must be an int >= 2 (pairs need two responses), got {k!r}")
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"--seed must be an int >= 0, got {seed!r}")
  if num_prompts < 1 or num_test_prompts < 1:
    raise ValueError(f"--num_prompts ({num_prompts}) and --num_test_prompts "
                     f"({num_test_prompts}) must be >= 1")
  if split not in ("train", "test"):
    raise ValueError(f"--split must be 'train' or 'test', got {split!r}")
  pairs = parse_pairs_per_prompt(pairs_per_prompt)
  if isinstance(pairs, int) and pairs > k * (k - 1) // 2:
    raise ValueError(f"--pairs_per_prompt={pairs} exceeds the k(k-1)/2={k * (k - 1) // 2} "
                     f"pairs of k={k} responses")
  policy_lib.read_config(policy_path)
  checkpoint_lib.checkpoint_dir(policy_path)
  _check_out_dir(out_dir)
  return pairs


def _digest(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def sample_responses(policy_path: str, *, k: int, num_prompts: int, num_test_prompts: int,
                     seed: int, split: str, max_new_tokens: int | None,
                     sample_temperature: float | None, top_k: int | None, top_p: float | None,
                     batch_size: int | None, data_dir: str, score_fn, mesh=None,
                     prompt_run: str = ""):
  """k responses to each train and test prompt, scored: what every labeller judges.

  Train prompts are [0, num_prompts) of `split`, test prompts the next `num_test_prompts`
  held-out ('test') prompts (after the train ones when `split` is 'test', so the two never
  share a prompt), from the prompt source of the policy's config, or of run `prompt_run`'s
  when given (a policy fine-tuned on a prepared dataset samples the prompts of the run
  it started from). Sampling options left None come from the policy config's `sampling`.

  Returns ({'train'|'test': (prompts, responses [prompts][k], scores [prompts, k])},
  settings): the settings (policy, checkpoint step, prompts, sampling, gold) that, with
  the labeller's own, name the dataset.
  """
  config, model, params = policy_lib.load_policy(policy_path, mesh)
  tokenizer = policy_lib.make_tokenizer(config)
  defaults = policy_lib.sampling_options(config)
  given = dict(max_new_tokens=max_new_tokens, temperature=sample_temperature, top_k=top_k,
               top_p=top_p, batch_size=batch_size)
  defaults["batch_size"] = defaults.pop("eval_batch_size")
  sample = {key: defaults[key] if value is None else value for key, value in given.items()}
  sample["prompt_len"] = config.data.prompt_len
  data_dir = data_dir or common.data_dir(config, policy_path)
  _, step = checkpoint_lib.checkpoint_dir(policy_path)
  prompt_config = policy_lib.read_config(prompt_run) if prompt_run else config

  test_start = num_prompts if split == "test" else 0
  prompt_sets = {
      "train": policy_lib.heldout_prompts(prompt_config, data_dir, split, num_prompts),
      "test": policy_lib.heldout_prompts(prompt_config, data_dir, "test", num_test_prompts,
                                         start=test_start),
  }
  root = jax.random.key(seed)
  samples = {}
  for index, name in enumerate(("train", "test")):
    prompts = prompt_sets[name]
    repeated = [p for p in prompts for _ in range(k)]
    out = policy_lib.generate(model, params, repeated, tokenizer,
                              jax.random.fold_in(root, index), **sample)
    scores = np.asarray(score_fn(repeated, out["texts"]), np.float64).reshape(len(prompts), k)
    responses = [out["texts"][i * k:(i + 1) * k] for i in range(len(prompts))]
    samples[name] = (prompts, responses, scores)
  settings = {
      "policy": os.path.abspath(policy_path), "checkpoint_step": step,
      "prompts": {"split": split, "num_prompts": num_prompts,
                  **({"run": os.path.abspath(prompt_run)} if prompt_run else {}),
                  "num_test_prompts": num_test_prompts, "test_start": test_start},
      "sampling": sample,
      "gold": f"{score_fn.__module__}.{score_fn.__qualname__}",
  }
  return samples, settings


def label(policy_path: str, out_dir: str, *, k: int = 4, temperature: float = 0.5,
          flip_rate: float = 0.0, num_prompts: int = 1000, num_test_prompts: int = 200,
          seed: int = 0, pairs_per_prompt="all", split: str = "train", tie_eps: float = 0.0,
          max_new_tokens: int | None = None, sample_temperature: float | None = None,
          top_k: int | None = None, top_p: float | None = None, batch_size: int | None = None,
          data_dir: str = "", score_fn=None, mesh=None, prompt_run: str = "",
          verbose: bool = False) -> str:
  """Samples (`sample_responses`), labels pairs with the simulated annotators; returns the
  prepared preference dataset's directory.

  `score_fn(prompts, responses) -> [N]` scores responses; default
  `policy_lib.gold_scores` (VADER on prompt + response).
  ValueError / FileNotFoundError for bad arguments, raised before any sampling.
  """
  score_fn = score_fn or policy_lib.gold_scores
  pairs = _validate(policy_path, out_dir, k, seed, num_prompts, num_test_prompts, split,
                    pairs_per_prompt)
  if not temperature >= 0:
    raise ValueError(f"--temperature (annotator) must be >= 0, got {temperature}")
  if not 0.0 <= flip_rate <= 0.5:
    raise ValueError(f"--flip_rate must be in [0, 0.5], got {flip_rate}")
  if not tie_eps >= 0:
    raise ValueError(f"--tie_eps must be >= 0, got {tie_eps}")
  samples, settings = sample_responses(
      policy_path, k=k, num_prompts=num_prompts, num_test_prompts=num_test_prompts, seed=seed,
      split=split, max_new_tokens=max_new_tokens, sample_temperature=sample_temperature,
      top_k=top_k, top_p=top_p, batch_size=batch_size, data_dir=data_dir, score_fn=score_fn,
      mesh=mesh, prompt_run=prompt_run)
  records, stats = {}, {}
  for index, (name, (prompts, responses, scores)) in enumerate(samples.items()):
    records[name], split_stats = annotators.label_pairs(
        prompts, responses, scores, rng_seed=2 * seed + index, temperature=temperature,
        flip_rate=flip_rate, pairs_per_prompt=pairs, tie_eps=tie_eps)
    if not records[name]:
      raise ValueError(f"{name} split: no pair was labelled ({split_stats['ties']} of "
                       f"{split_stats['pairs']} pairs tied); sample more prompts or at a "
                       "higher temperature")
    stats.update({f"{name}_{key}": v for key, v in split_stats.items()})
    stats[f"{name}_prompts"] = len(prompts)
    stats[f"{name}_gold_mean"] = float(scores.mean())
    stats[f"{name}_gold_std"] = float(scores.std())
    if verbose:
      print(f"{name}: {len(prompts)} prompts x {k} responses, gold mean "
            f"{scores.mean():.3f} std {scores.std():.3f}; {split_stats['labelled']} pairs "
            f"labelled, {split_stats['ties']} ties, agreement with gold "
            f"{split_stats['agreement_rate']:.3f}")

  settings["labeller"] = {"k": k, "temperature": temperature, "flip_rate": flip_rate,
                          "pairs_per_prompt": pairs, "tie_eps": tie_eps, "seed": seed}
  name = f"simulated-{_digest(settings)}"
  tfds.disable_progress_bar()
  return tfds_builders.prepare(
      "preference", name, {s: (lambda rows=rows: rows) for s, rows in records.items()},
      data_dir=out_dir, metadata=dict(settings, source="simulated", stats=stats),
      with_scores=True)


def label_ai(policy_path: str, out_dir: str, judge_path: str, constitution_path: str, *,
             k: int = 4, num_prompts: int = 1000, num_test_prompts: int = 200, seed: int = 0,
             pairs_per_prompt="all", split: str = "train", principles: str = "sample",
             prompt_format: str = "auto", chat_template: str = "", judge_batch_size: int = 16,
             judge_bucket: int = 32, judge_max_len: int | None = None,
             max_new_tokens: int | None = None, sample_temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None,
             batch_size: int | None = None, data_dir: str = "", score_fn=None,
             prompt_run: str = "", verbose: bool = False) -> str:
  """RLAIF labels (Lee et al. 2023): the responses `label` would sample (same seed, same
  pairs for 'all' / 'adjacent'), each pair judged by `judge_path` under the constitution
  (`rlhf_jax.feedback.judge`); returns the preference dataset's directory. Its `margin`
  column is the judge's log-odds. Errors are raised before sampling."""
  score_fn = score_fn or policy_lib.gold_scores
  if not judge_path:
    raise ValueError("--labeler=ai needs --judge (an rlhf_jax run's workdir or a Hugging "
                     "Face directory)")
  if judge_batch_size < 1 or judge_bucket < 1:
    raise ValueError(f"--judge_batch_size ({judge_batch_size}) and --judge_bucket "
                     f"({judge_bucket}) must be >= 1")
  pairs = _validate(policy_path, out_dir, k, seed, num_prompts, num_test_prompts, split,
                    pairs_per_prompt)
  constitution = constitution_lib.load(constitution_path)
  constitution_lib.choose_principles(constitution, 0, principles, 0)    # checks the name
  judge = feedback_models.load(judge_path, chat_template_file=chat_template,
                               max_len=judge_max_len)
  fmt = constitution_lib.make_format(constitution, prompt_format, judge.chat_template,
                                     judge.special_tokens)
  judge_lib.option_token_ids(judge, constitution.options, f"{constitution.path}: field options")

  samples, settings = sample_responses(
      policy_path, k=k, num_prompts=num_prompts, num_test_prompts=num_test_prompts, seed=seed,
      split=split, max_new_tokens=max_new_tokens, sample_temperature=sample_temperature,
      top_k=top_k, top_p=top_p, batch_size=batch_size, data_dir=data_dir, score_fn=score_fn,
      prompt_run=prompt_run)
  records, rows, stats = {}, {}, {}
  for index, (name, (prompts, responses, scores)) in enumerate(samples.items()):
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

  settings["labeller"] = {
      "k": k, "pairs_per_prompt": pairs, "seed": seed, "principles": principles,
      "prompt_format": fmt.kind, "chat_template": _digest(fmt.chat_template),
      "judge": judge.source, "judge_kind": judge.kind,
      "constitution": constitution.describe()}
  if judge.kind == "run":
    settings["labeller"]["judge_checkpoint_step"] = checkpoint_lib.checkpoint_dir(judge_path)[1]
  return judge_lib.write_dataset(out_dir, f"ai-{_digest(settings)}", records, rows,
                                 dict(settings, source="ai", stats=stats), with_scores=True)
