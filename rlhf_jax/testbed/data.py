"""The sentiment testbed as data source `testbed`: its review corpus as text, review
continuations as demonstrations, review prefixes as prompts (registered on import)."""

import ml_collections

from rlhf_jax.data import sources
from rlhf_jax.testbed import corpus


def _reviews(dc: ml_collections.ConfigDict) -> dict[str, list[str]]:
  return corpus.corpus_splits(dc.corpus_seed, num_train=dc.corpus_train, num_test=dc.corpus_test)


def _settings(dc: ml_collections.ConfigDict) -> dict:
  return {"corpus_seed": dc.corpus_seed, "corpus_train": dc.corpus_train,
          "corpus_test": dc.corpus_test}


def texts(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """The corpus, for pretraining."""
  def make():
    return {s: [{"text": t} for t in rows] for s, rows in _reviews(dc).items()}, {}
  return sources.prepare_records("text", dc, data_dir, make, _settings(dc))


def demonstrations(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """(prefix, continuation) of each review."""
  def make():
    return {s: corpus.demonstrations(rows, seed=dc.corpus_seed + i)
            for i, (s, rows) in enumerate(sorted(_reviews(dc).items()))}, {}
  return sources.prepare_records("demonstration", dc, data_dir, make, _settings(dc))


def prompts(dc: ml_collections.ConfigDict, data_dir: str) -> tuple[str, dict]:
  """Review prefixes (held-out reviews give the test split)."""
  def make():
    return {s: [{"prompt": p} for p in corpus.prompts_from_reviews(rows, seed=dc.corpus_seed + i)]
            for i, (s, rows) in enumerate(sorted(_reviews(dc).items()))}, {}
  return sources.prepare_records("prompt", dc, data_dir, make, _settings(dc))


sources.register("testbed", text=texts, demonstration=demonstrations, prompt=prompts)
