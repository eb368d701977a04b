"""The data-source registry: `config.data.source` -> a prepared TFDS dataset of one kind.

A source provides some of the record kinds (text, demonstration, preference, prompt):
  jsonl    `config.data.train_file` (+ `eval_file`, or a seeded split of the train file)
  alpaca   the Alpaca seed-task format (demonstrations)
  hh       the Anthropic HH-RLHF format (preferences)
  dataset  `config.data.dataset_dir`, a dataset already prepared by `tfds_builders.prepare`
           (e.g. simulated preferences written by `experiments.label_preferences`)
and a testbed registers its own on import (`rlhf_jax.testbed` registers `testbed`, the
sentiment corpus). `prepare(kind, config.data, data_dir)` returns (dataset_dir, stats). A
dataset's name is a digest of the settings and file contents it is made from, so a
changed file or setting prepares a new dataset and an unchanged one is reused.
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
from rlhf_jax import registry

KINDS = ("text", "demonstration", "preference", "prompt")

# fn(config.data, data_dir) -> (dataset_dir, stats)
Provider = Callable[[ml_collections.ConfigDict, str], tuple[str, dict]]

# source name -> {kind: provider}
SOURCES: registry.Registry[dict[str, Provider]] = registry.Registry(
    "data source", "config.data.source",
    hint="a testbed registers its sources on import, e.g. `import rlhf_jax.testbed`")


def register(name: str, **providers: Provider) -> None:
  """Registers source `name` with a provider for each record kind it can give."""
  unknown = set(providers) - set(KINDS)
  if unknown:
    raise ValueError(f"data source {name!r}: unknown kinds {sorted(unknown)}; kinds: {KINDS}")
  SOURCES.register(name, providers)


def prepare(kind: str, dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """The `kind` records of source `config.data.source`, prepared under `data_dir`."""
  providers = SOURCES.get(dc.source)
  if kind not in providers:
    able = [n for n in SOURCES.names() if kind in SOURCES.get(n)]
    raise ValueError(f"config.data.source={dc.source!r} cannot provide {kind} data; sources "
                     f"that can: {', '.join(able)}")
  return providers[kind](dc, data_dir)


def texts(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """Plain text for pretraining."""
  return prepare("text", dc, data_dir)


def demonstrations(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """(prompt, response) pairs for SFT."""
  return prepare("demonstration", dc, data_dir)


def preferences(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """(prompt, chosen, rejected) pairs for reward models and DPO."""
  return prepare("preference", dc, data_dir)


def prompts(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """Prompts for sampling stages."""
  return prepare("prompt", dc, data_dir)


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


def _from_files(dc: ml_collections.ConfigDict, fmt: str) -> tuple[dict[str, list], dict]:
  """Train and test records of `config.data.train_file` (and `eval_file`) in jsonl format `fmt`."""
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


def prepare_records(kind: str, dc: ml_collections.ConfigDict, data_dir: str,
                    make_splits: Callable[[], tuple[dict[str, list], dict]],
                    settings: dict) -> tuple[str, dict]:
  """Prepares `make_splits() -> ({split: records}, stats)` once as a `kind` dataset named by
  the source and a digest of `settings` and the data files; later calls reuse it."""
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
        metadata={"source": dc.source, "settings": settings, "stats": stats})
  return dataset_dir, stats


def _file_provider(kind: str, fmt: str) -> Provider:
  def provide(dc, data_dir):
    settings = {"on_error": dc.on_error, "eval_fraction": dc.eval_fraction,
                "split_seed": dc.split_seed}
    return prepare_records(kind, dc, data_dir, lambda: _from_files(dc, fmt), settings)
  return provide


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


def _dataset_demonstrations(dc, data_dir):
  """A prepared demonstration dataset, or the chosen responses of a preference dataset
  ("preferred-FT")."""
  if _kind_of(dc) != "preference":
    return _existing(dc, "demonstration")
  def make():
    splits = tfds_builders.load(dc.dataset_dir, kind="preference")
    return {s: [{"prompt": r["prompt"], "response": r["chosen"]}
                for r in src.__getitems__(range(len(src)))] for s, src in splits.items()}, {}
  return prepare_records("demonstration", dc, data_dir, make,
                         {"chosen_of": os.path.abspath(dc.dataset_dir)})


register("jsonl", demonstration=_file_provider("demonstration", "demonstration"),
         preference=_file_provider("preference", "preference"))
register("alpaca", demonstration=_file_provider("demonstration", "alpaca"))
register("hh", preference=_file_provider("preference", "hh"))
register("dataset", **{**{kind: (lambda dc, data_dir, kind=kind: _existing(dc, kind))
                          for kind in KINDS}, "demonstration": _dataset_demonstrations})
