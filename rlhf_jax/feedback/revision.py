"""Critique and revision (SL-CAI, Bai et al. 2022, Sec. 3.1): a model answers a prompt,
critiques its answer under a principle, and revises it; the (prompt, revision) pairs are
the supervised fine-tuning data of the Constitutional AI model.

For each prompt: response = sample(template 'response'), then for each round r:
critique = sample(template 'critique' with the current response and principle r's
critique request), revision = sample(template 'revision' with the critique and the
revision request), and the revision becomes the current response. Each step is one
batched `sampling.sample` call per `batch_size` prompts (through `models.sample_texts`).
Principles per round: 'sample' (one drawn per prompt and round, as Bai et al. do), 'all'
(round r uses principle r mod P: rounds = P goes through every principle once) or one
principle's name.
"""

import hashlib
import json
import os
from typing import Mapping, Sequence

import jax
import numpy as np

from rlhf_jax.data import tfds_builders
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import models
from rlhf_jax.train import checkpoint as checkpoint_lib


def round_principles(constitution: constitution_lib.Constitution, num_prompts: int,
                     rounds: int, mode: str, seed: int) -> np.ndarray:
  """[rounds, num_prompts] principle indices."""
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  if mode == "all":
    return np.tile(np.arange(rounds)[:, None] % len(constitution.principles), (1, num_prompts))
  chosen = constitution_lib.choose_principles(constitution, rounds * num_prompts, mode, seed)
  return np.asarray([c[0] for c in chosen]).reshape(rounds, num_prompts)


def critique_and_revise(lm: models.LanguageModel,
                        constitution: constitution_lib.Constitution,
                        fmt: constitution_lib.PromptFormat, prompts: Sequence[str],
                        rng: jax.Array, *, rounds: int = 1, principles: str = "sample",
                        seed: int = 0, response_tokens: int = 48, critique_tokens: int = 48,
                        revision_tokens: int = 48, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0, greedy: bool = False, batch_size: int = 16,
                        bucket: int = 32, stop: Sequence[str] = (),
                        responses: Sequence[str] | None = None,
                        progress: models.Progress | None = None) -> list[dict]:
  """Runs the loop on every prompt; returns one record per prompt:

    {'prompt', 'response' (the first sample), 'rounds': [{'principle', 'critique',
     'revision'}, ...], 'revision' (the last round's)}

  Sampling call `c` (0: responses, then critique and revision of each round) uses
  `fold_in(rng, c)`; `stop` strings cut critiques and revisions (not the response).
  `responses`: the first responses, written by another model (a policy whose samples
  `lm` critiques and revises); None samples them from `lm`.
  """
  indices = round_principles(constitution, len(prompts), rounds, principles, seed)
  sample = lambda texts, call, max_new, stop_at: models.sample_texts(
      lm, texts, jax.random.fold_in(rng, call), add_bos=fmt.add_bos, max_new_tokens=max_new,
      temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
      batch_size=batch_size, bucket=bucket, stop=stop_at)
  steps = 1 + 2 * rounds

  if responses is None:
    current = sample([fmt.render(constitution.turn("response", prompt=p)) for p in prompts],
                     0, response_tokens, ())
  elif len(responses) != len(prompts):
    raise ValueError(f"critique_and_revise: {len(responses)} responses for {len(prompts)} "
                     "prompts")
  else:
    current = list(responses)
  records = [{"prompt": p, "response": r, "rounds": []} for p, r in zip(prompts, current)]
  if progress:
    progress.update(len(prompts) / steps)
  for r in range(rounds):
    chosen = [constitution.principles[i] for i in indices[r]]
    critiques = sample([fmt.render(constitution.turn(
        "critique", prompt=p, response=c, critique_request=q.critique_request))
        for p, c, q in zip(prompts, current, chosen)], 1 + 2 * r, critique_tokens, stop)
    if progress:
      progress.update(len(prompts) * (2 + 2 * r) / steps)
    current = sample([fmt.render(constitution.turn(
        "revision", prompt=p, response=c, critique_request=q.critique_request, critique=k,
        revision_request=q.revision_request))
        for p, c, q, k in zip(prompts, current, chosen, critiques)], 2 + 2 * r,
        revision_tokens, stop)
    if progress:
      progress.update(len(prompts) * (3 + 2 * r) / steps)
    for record, q, k, v in zip(records, chosen, critiques, current):
      record["rounds"].append({"principle": q.name, "critique": k, "revision": v})
  for record in records:
    record["revision"] = record["rounds"][-1]["revision"]
  return records


def demonstrations(records: Sequence[dict]) -> tuple[list[dict], dict]:
  """(prompt, revision) demonstration records, dropping empty revisions; and stats."""
  kept = [{"prompt": r["prompt"], "response": r["revision"]} for r in records
          if r["revision"].strip()]
  changed = sum(r["revision"] != r["response"] for r in records)
  return kept, {
      "prompts": len(records), "kept": len(kept), "empty_revisions": len(records) - len(kept),
      "changed_rate": changed / len(records) if records else 0.0,
      "response_chars": float(np.mean([len(r["response"]) for r in records])) if records else 0.0,
      "revision_chars": float(np.mean([len(r["revision"]) for r in records])) if records else 0.0,
  }


def write_dataset(out_dir: str, name: str, records: Mapping[str, Sequence[dict]],
                  metadata: dict) -> tuple[str, dict]:
  """Prepares the demonstration dataset of (prompt, revision) pairs, one split per key of
  `records` (SFT reads 'train' and 'test'), and writes every record (original, critiques,
  revisions) beside its files as `revisions-<split>.jsonl`. Returns (dir, stats)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  splits, stats = {}, {}
  for split, split_records in records.items():
    splits[split], split_stats = demonstrations(split_records)
    if not splits[split]:
      raise ValueError(f"{split} split: every revision is empty; nothing to train on")
    stats.update({f"{split}_{k}": v for k, v in split_stats.items()})
  dataset_dir = tfds_builders.prepare(
      "demonstration", name, {s: (lambda r=r: r) for s, r in splits.items()},
      data_dir=out_dir, metadata=dict(metadata, stats=stats))
  for split, split_records in records.items():
    with open(os.path.join(dataset_dir, f"revisions-{split}.jsonl"), "w") as f:
      for record in split_records:
        f.write(json.dumps(record) + "\n")
  return dataset_dir, stats


def make_dataset(lm: models.LanguageModel, constitution: constitution_lib.Constitution,
                 fmt: constitution_lib.PromptFormat, prompt_sets: Mapping[str, Sequence[str]],
                 out_dir: str, *, seed: int = 0, settings: Mapping | None = None,
                 responses: Mapping[str, Sequence[str]] | None = None,
                 progress: bool = True, **options) -> tuple[str, dict]:
  """Critiques and revises every prompt of each split ({'train': [...], 'test': [...]}),
  split `i` with `fold_in(key(seed), i)`, and writes the demonstration dataset
  (`write_dataset`). Its name is a digest of the model, format, constitution, seed,
  `options` (those of `critique_and_revise`) and `settings` (e.g. where the prompts
  came from, and who wrote `responses` {split: [...]} when given; their digest is
  included): the same inputs write the same dataset. Returns (dataset dir, stats)."""
  settings = {
      **dict(settings or {}),
      "model": lm.source, "model_kind": lm.kind, "prompt_format": fmt.kind,
      "chat_template": hashlib.sha256(fmt.chat_template.encode()).hexdigest()[:12],
      "constitution": constitution.describe(), "seed": seed,
      "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
  }
  if responses is not None:
    settings["responses"] = hashlib.sha256(
        json.dumps({k: list(v) for k, v in responses.items()}, sort_keys=True).encode()
    ).hexdigest()[:12]
  if lm.kind == "run":
    settings["checkpoint_step"] = checkpoint_lib.checkpoint_dir(lm.source)[1]
  records = {}
  root = jax.random.key(seed)
  for index, (name, prompts) in enumerate(prompt_sets.items()):
    tracker = (models.Progress(f"critique-revise {name}", len(prompts), "prompts")
               if progress else None)
    records[name] = critique_and_revise(lm, constitution, fmt, prompts,
                                        jax.random.fold_in(root, index),
                                        seed=2 * seed + index, progress=tracker,
                                        responses=None if responses is None else responses[name],
                                        **options)
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
  return write_dataset(out_dir, f"revisions-{digest}", records,
                       dict(settings, source="critique_revise"))
