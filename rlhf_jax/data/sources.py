"""Named data sources of the config -> prepared TFDS datasets.

`config.data.source` picks where records come from:
  testbed  the sentiment testbed's generated corpus (no file needed; the default)
  jsonl    `config.data.train_file` (+ `eval_file`, or a seeded split of the train file)
  alpaca   the Alpaca seed-task format (demonstrations)
  hh       the Anthropic HH-RLHF format (preferences)
  dataset  `config.data.dataset_dir`, a dataset already prepared by `tfds_builders.prepare`
           (e.g. simulated preferences written by `experiments.label_preferences`)
Each function returns (dataset_dir, stats). A dataset's name is a digest of the
settings and file contents it is made from, so a changed file or setting prepares
a new dataset and an unchanged one is reused.
"""

import fcntl
import hashlib
import json
import os
from typing import Callable

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import jsonl
from rlhf_jax.data import tfds_builders
from rlhf_jax.testbed import corpus

_FILE_FORMATS = {  # (source, kind) -> jsonl.read format
    ("jsonl", "demonstration"): "demonstration",
    ("alpaca", "demonstration"): "alpaca",
    ("jsonl", "preference"): "preference",
    ("hh", "preference"): "hh",
}


def _digest(*parts) -> str:
  h = hashlib.sha256()
  for part in parts:
    if isinstance(part, str) and os.path.isfile(part):
      with open(part, "rb") as f:
        h.update(f.read())
    h.update(json.dumps(part, sort_keys=True, default=str).encode())
  return h.hexdigest()[:12]


def _split_records(records: list, eval_fraction: float, seed: int) -> dict[str, list]:
  """A seeded split of one file's records into train and test."""
  if not 0 < eval_fraction < 1:
    raise ValueError(f"config.data.eval_fraction must be in (0, 1), got {eval_fraction}")
  order = np.random.default_rng(seed).permutation(len(records))
  n_eval = max(1, int(round(eval_fraction * len(records))))
  test = set(order[:n_eval].tolist())
  return {"train": [r for i, r in enumerate(records) if i not in test],
          "test": [r for i, r in enumerate(records) if i in test]}


def _from_files(dc: ml_collections.ConfigDict, kind: str) -> tuple[dict[str, list], dict]:
  fmt = _FILE_FORMATS.get((dc.source, kind))
  if fmt is None:
    raise ValueError(f"config.data.source={dc.source!r} cannot provide {kind} data "
                     f"(choose from {sorted(s for s, k in _FILE_FORMATS if k == kind)}, "
                     "testbed or dataset)")
  if not dc.train_file:
    raise ValueError(f"config.data.train_file must name a file for source {dc.source!r}")
  records, stats = jsonl.read(fmt, dc.train_file, on_error=dc.on_error)
  stats = {"train_" + k: v for k, v in stats.items() if isinstance(v, int)}
  if dc.eval_file:
    test, eval_stats = jsonl.read(fmt, dc.eval_file, on_error=dc.on_error)
    stats.update({"eval_" + k: v for k, v in eval_stats.items() if isinstance(v, int)})
    splits = {"train": records, "test": test}
  else:
    splits = _split_records(records, dc.eval_fraction, dc.split_seed)
  for split, rows in splits.items():
    if not rows:
      raise ValueError(f"{dc.train_file}: the {split} split is empty")
  return splits, stats


def _prepare(kind: str, dc: ml_collections.ConfigDict, data_dir: str,
             make_splits: Callable[[], tuple[dict[str, list], dict]], settings: dict,
             with_scores: bool = False) -> tuple[str, dict]:
  name = f"{dc.source}-{_digest(kind, settings, dc.train_file, dc.eval_file)}"
  dataset_dir = os.path.join(data_dir, kind, name, "1.0.0")
  os.makedirs(os.path.dirname(dataset_dir), exist_ok=True)
  # Runs of a sweep share data_dir: one prepares, the others wait and reuse.
  with open(dataset_dir + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
      return dataset_dir, tfds_builders.read_metadata(dataset_dir).get("stats", {})
    splits, stats = make_splits()
    tfds.disable_progress_bar()
    dataset_dir = tfds_builders.prepare(
        kind, name, {s: (lambda rows=rows: rows) for s, rows in splits.items()}, data_dir,
        metadata={"source": dc.source, "settings": settings, "stats": stats},
        with_scores=with_scores)
  return dataset_dir, stats


def _testbed_reviews(dc) -> dict[str, list[str]]:
  return corpus.corpus_splits(dc.corpus_seed, num_train=dc.corpus_train, num_test=dc.corpus_test)


def _testbed_settings(dc) -> dict:
  return {"corpus_seed": dc.corpus_seed, "corpus_train": dc.corpus_train,
          "corpus_test": dc.corpus_test}


def texts(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """Pretraining text: the testbed corpus."""
  if dc.source != "testbed":
    raise ValueError(f"config.data.source={dc.source!r}: pretraining reads the testbed corpus")
  def make():
    reviews = _testbed_reviews(dc)
    return {s: [{"text": t} for t in rows] for s, rows in reviews.items()}, {}
  return _prepare("text", dc, data_dir, make, _testbed_settings(dc))


def demonstrations(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """(prompt, response) pairs: testbed review continuations, JSONL / Alpaca files, or a
  prepared dataset; a preference dataset gives its chosen responses ("preferred-FT")."""
  if dc.source == "dataset" and _kind_of(dc) == "preference":
    def make():
      splits = tfds_builders.load(dc.dataset_dir, kind="preference")
      return {s: [{"prompt": r["prompt"], "response": r["chosen"]}
                  for r in src.__getitems__(range(len(src)))] for s, src in splits.items()}, {}
    return _prepare("demonstration", dc, data_dir, make,
                    {"chosen_of": os.path.abspath(dc.dataset_dir)})
  if dc.source == "dataset":
    return _existing(dc, "demonstration")
  if dc.source == "testbed":
    def make():
      reviews = _testbed_reviews(dc)
      return {s: corpus.demonstrations(rows, seed=dc.corpus_seed + i)
              for i, (s, rows) in enumerate(sorted(reviews.items()))}, {}
    return _prepare("demonstration", dc, data_dir, make, _testbed_settings(dc))
  settings = {"on_error": dc.on_error, "eval_fraction": dc.eval_fraction, "split_seed": dc.split_seed}
  return _prepare("demonstration", dc, data_dir, lambda: _from_files(dc, "demonstration"), settings)


def preferences(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """(prompt, chosen, rejected) pairs: JSONL / HH files or a prepared (simulated) dataset."""
  if dc.source == "dataset":
    return _existing(dc, "preference")
  if dc.source == "testbed":
    raise ValueError("config.data.source='testbed' has no preference pairs of its own: label "
                     "some with experiments.label_preferences and use source='dataset'")
  settings = {"on_error": dc.on_error, "eval_fraction": dc.eval_fraction, "split_seed": dc.split_seed}
  return _prepare("preference", dc, data_dir, lambda: _from_files(dc, "preference"), settings)


def prompts(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """Prompts for sampling: prefixes of testbed reviews (held-out reviews give the test split)."""
  if dc.source == "dataset":
    return _existing(dc, "prompt")
  if dc.source != "testbed":
    raise ValueError(f"config.data.source={dc.source!r}: prompts come from the testbed "
                     "or a prepared dataset")
  def make():
    reviews = _testbed_reviews(dc)
    return {s: [{"prompt": p} for p in corpus.prompts_from_reviews(rows, seed=dc.corpus_seed + i)]
            for i, (s, rows) in enumerate(sorted(reviews.items()))}, {}
  return _prepare("prompt", dc, data_dir, make, _testbed_settings(dc))


def _kind_of(dc: ml_collections.ConfigDict) -> str:
  if not dc.dataset_dir:
    raise ValueError("config.data.dataset_dir must name a prepared dataset for source 'dataset'")
  return tfds_builders.read_metadata(dc.dataset_dir).get("kind")


def _existing(dc: ml_collections.ConfigDict, kind: str) -> tuple[str, dict]:
  meta = tfds_builders.read_metadata(dc.dataset_dir) if _kind_of(dc) else {}
  if meta.get("kind") != kind:
    raise ValueError(f"config.data.dataset_dir={dc.dataset_dir!r} holds a {meta.get('kind')!r} "
                     f"dataset, this stage needs {kind!r}")
  return dc.dataset_dir, meta.get("stats", {})
