"""Simulated preference labelling: sample k responses per prompt, score with the gold
reward, label pairs with the simulated annotators, save as a preference dataset.

The dataset is a function of the policy checkpoint and the settings: the same seed
writes byte-identical array_record files. experiments/label_preferences.py is its
command line; the pipeline calls `label` directly.
"""

import glob
import hashlib
import json
import os

import jax
import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import tfds_builders
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


def _validate(policy_path, out_dir, k, seed, temperature, flip_rate, num_prompts,
              num_test_prompts, split, pairs_per_prompt, tie_eps):
  if not isinstance(k, int) or k < 2:
    raise ValueError(f"--k must be an int >= 2 (pairs need two responses), got {k!r}")
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"--seed must be an int >= 0, got {seed!r}")
  if not temperature >= 0:
    raise ValueError(f"--temperature (annotator) must be >= 0, got {temperature}")
  if not 0.0 <= flip_rate <= 0.5:
    raise ValueError(f"--flip_rate must be in [0, 0.5], got {flip_rate}")
  if not tie_eps >= 0:
    raise ValueError(f"--tie_eps must be >= 0, got {tie_eps}")
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


def label(policy_path: str, out_dir: str, *, k: int = 4, temperature: float = 0.5,
          flip_rate: float = 0.0, num_prompts: int = 1000, num_test_prompts: int = 200,
          seed: int = 0, pairs_per_prompt="all", split: str = "train", tie_eps: float = 0.0,
          max_new_tokens: int | None = None, sample_temperature: float | None = None,
          top_k: int | None = None, top_p: float | None = None, batch_size: int | None = None,
          data_dir: str = "", score_fn=None, mesh=None, verbose: bool = False) -> str:
  """Samples, scores and labels; returns the prepared preference dataset's directory.

  Train pairs come from prompts [0, num_prompts) of `split`, test pairs from the
  next `num_test_prompts` held-out ('test') prompts (after the train ones when `split`
  is 'test', so the two never share a prompt).
  Sampling options left None come from the policy config's `sampling` block.
  `score_fn(prompts, responses) -> [N]` scores responses; default
  `policy_lib.gold_scores` (VADER on prompt + response).
  ValueError / FileNotFoundError for bad arguments, raised before any sampling.
  """
  score_fn = score_fn or policy_lib.gold_scores
  pairs = _validate(policy_path, out_dir, k, seed, temperature, flip_rate, num_prompts,
                    num_test_prompts, split, pairs_per_prompt, tie_eps)
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

  test_start = num_prompts if split == "test" else 0
  prompt_sets = {
      "train": policy_lib.heldout_prompts(config, data_dir, split, num_prompts),
      "test": policy_lib.heldout_prompts(config, data_dir, "test", num_test_prompts,
                                         start=test_start),
  }
  root = jax.random.key(seed)
  records, stats = {}, {}
  for index, name in enumerate(("train", "test")):
    prompts = prompt_sets[name]
    repeated = [p for p in prompts for _ in range(k)]
    out = policy_lib.generate(model, params, repeated, tokenizer,
                              jax.random.fold_in(root, index), **sample)
    scores = np.asarray(score_fn(repeated, out["texts"]), np.float64).reshape(len(prompts), k)
    responses = [out["texts"][i * k:(i + 1) * k] for i in range(len(prompts))]
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

  settings = {
      "policy": os.path.abspath(policy_path), "checkpoint_step": step,
      "labeller": {"k": k, "temperature": temperature, "flip_rate": flip_rate,
                   "pairs_per_prompt": pairs, "tie_eps": tie_eps, "seed": seed},
      "prompts": {"split": split, "num_prompts": num_prompts,
                  "num_test_prompts": num_test_prompts, "test_start": test_start},
      "sampling": sample,
      "gold": f"{score_fn.__module__}.{score_fn.__qualname__}",
  }
  name = f"simulated-{_digest(settings)}"
  tfds.disable_progress_bar()
  return tfds_builders.prepare(
      "preference", name, {s: (lambda rows=rows: rows) for s, rows in records.items()},
      data_dir=out_dir, metadata=dict(settings, source="simulated", stats=stats),
      with_scores=True)
