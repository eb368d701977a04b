"""Grain pipelines: a seeded, checkpointable train iterator and fixed eval batches.

Train order: the record indices are shuffled with a seed derived from `seed`, a new
permutation each epoch (grain's index shuffle), repeated forever. Process
`shard_index` of `shard_count` reads only elements `shard_index::shard_count` of that
global stream, so without dropped examples the global batch (the processes' batches
side by side) holds the same examples whatever `shard_count` is.

`transform(record)` returns an example (a dict of NumPy arrays) or None for a record
that does not fit; Nones are dropped and counted (`stats['dropped']`), never silent.
"""

import json
from typing import Any, Callable, Sequence

from absl import logging
import grain
import numpy as np

Example = dict[str, np.ndarray]
Transform = Callable[[Any], Example | None]


def stack(examples: Sequence[Example]) -> Example:
  """List of examples -> batch dict with a leading `[batch]` axis."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def _per_process_batch(batch_size: int, shard_index: int, shard_count: int) -> int:
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
  if batch_size < 1 or batch_size % shard_count:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                     f"shard_count={shard_count}")
  return batch_size // shard_count


class TrainIterator:
  """Infinite iterator of batches `{key: [batch_size // shard_count, ...]}`.

  `get_state()` returns a JSON-serialisable dict; `set_state(state)` on an iterator
  built with the same arguments makes the following batches exactly those the
  iterator that produced the state would have returned next.
  """

  def __init__(self, source: Sequence, transform: Transform, batch_size: int, seed: int,
               shard_index: int = 0, shard_count: int = 1, num_threads: int = 0,
               prefetch: int = 0):
    self.per_process_batch = _per_process_batch(batch_size, shard_index, shard_count)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if len(source) < shard_count:
      raise ValueError(f"source {source!r} has {len(source)} records, fewer than "
                       f"shard_count={shard_count}")
    if len(source) < batch_size:
      logging.warning("train split %r has %d records, fewer than one batch of %d: every batch "
                      "repeats records", source, len(source), batch_size)
    self._config = {"seed": int(seed), "batch_size": batch_size, "shard_index": shard_index,
                    "shard_count": shard_count, "source_len": len(source)}
    # Records read in a row without an example before deciding that none fits.
    self._max_drop_run = len(source) // shard_count + 1
    ds = grain.MapDataset.source(source).seed(int(seed)).shuffle().repeat()
    ds = ds[shard_index::shard_count].map(transform)
    # Threads (when asked for) only prefetch; the order stays the same.
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._it = iter(ds.to_iter_dataset(read_options, allow_nones=True))
    self._batches = 0
    self._dropped = 0

  def __iter__(self):
    return self

  def __next__(self) -> Example:
    examples, drop_run = [], 0
    while len(examples) < self.per_process_batch:
      example = next(self._it)
      if example is None:
        self._dropped += 1
        drop_run += 1
        if drop_run >= self._max_drop_run:
          raise ValueError(f"no record fits: the transform returned None for "
                           f"{drop_run} records in a row ({self._config})")
        continue
      drop_run = 0
      examples.append(example)
    self._batches += 1
    return stack(examples)

  @property
  def stats(self) -> dict[str, int]:
    """batches returned, examples in them, records dropped (transform gave None)."""
    examples = self._batches * self.per_process_batch
    return {"batches": self._batches, "examples": examples, "dropped": self._dropped,
            "records_read": examples + self._dropped}

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "batches": self._batches,
            "dropped": self._dropped, "config": dict(self._config)}

  def set_state(self, state: dict[str, Any]) -> None:
    state = json.loads(json.dumps(state))  # accept a state read back from JSON
    if state.get("config") != self._config:
      raise ValueError(f"iterator state was saved with {state.get('config')}, this "
                       f"iterator has {self._config}")
    self._it.set_state(state["grain"])
    self._batches = state["batches"]
    self._dropped = state["dropped"]


def make_train_iterator(source: Sequence, transform: Transform, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1, **kwargs) -> TrainIterator:
  """Shuffled (per epoch), repeated, transformed, batched; see TrainIterator.

  Args:
    source: random-access records (`len`, `[i]`), e.g. a `tfds_builders.load` split.
    transform: record -> example dict of arrays, or None (dropped and counted).
    batch_size: global batch size; each process gets `batch_size // shard_count`.
    seed: order seed; the same seed gives the same order.
    shard_index, shard_count: this process, e.g. jax.process_index()/process_count().
    **kwargs: num_threads, prefetch (grain.ReadOptions); default 0 (synchronous).
  """
  return TrainIterator(source, transform, batch_size, seed, shard_index, shard_count, **kwargs)


def make_eval_batches(source: Sequence, transform: Transform, batch_size: int,
                      max_batches: int | None = None, *, shard_index: int = 0,
                      shard_count: int = 1, drop_remainder: bool = False
                      ) -> tuple[list[Example], dict[str, int]]:
  """The first records in order, as fixed batches -> (batches, stats).

  Every batch has `valid` `[batch]` int32: 1 on real examples. Unless
  `drop_remainder`, the last partial batch is filled with copies of its last real
  example (valid 0; copies rather than zeros keep every row a well-formed sequence),
  so metrics must weight rows by `valid`. Every process transforms the same global
  batches and keeps rows `[shard_index * b, (shard_index + 1) * b)`, b = batch_size //
  shard_count, so all processes get the same number of batches.

  stats: records_read, dropped (transform gave None), examples (real rows), padded, batches.
  """
  per_process = _per_process_batch(batch_size, shard_index, shard_count)
  limit = None if max_batches is None else max_batches * batch_size
  examples, dropped, read = [], 0, 0
  while read < len(source) and (limit is None or len(examples) < limit):
    example = transform(source[read])
    read += 1
    if example is None:
      dropped += 1
    else:
      examples.append(example)
  if len(source) and not examples:
    raise ValueError(f"no record of {source!r} fits: the transform returned None for all "
                     f"{read} records read")
  full, rest = divmod(len(examples), batch_size)
  valid = [1] * len(examples)
  padded = 0
  if rest and not drop_remainder:
    padded = batch_size - rest
    examples = examples + [examples[-1]] * padded
    valid = valid + [0] * padded
    full += 1
  batches = []
  for b in range(full):
    rows = slice(b * batch_size + shard_index * per_process,
                 b * batch_size + (shard_index + 1) * per_process)
    batch = stack(examples[rows])
    batch["valid"] = np.asarray(valid[rows], np.int32)
    batches.append(batch)
  n_real = sum(valid[:full * batch_size])
  return batches, {"records_read": read, "dropped": dropped, "examples": n_real,
                   "padded": padded, "batches": full}


class Head(Sequence):
  """The first `n` records of a random-access source (n <= 0: all of them)."""

  def __init__(self, source: Sequence, n: int):
    if n > len(source):
      raise ValueError(f"asked for the first {n} records of {source!r}, which has {len(source)}")
    self.source, self.n = source, (n if n > 0 else len(source))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int):
    if not 0 <= index < self.n:
      raise IndexError(index)
    return self.source[index]

  def __repr__(self) -> str:
    return f"Head({self.source!r}, {self.n})"


class WithColumns(Sequence):
  """Records of `source` with per-record values added: record i gets `{k: v[i]}`."""

  def __init__(self, source: Sequence, columns: dict[str, np.ndarray]):
    for k, v in columns.items():
      if len(v) != len(source):
        raise ValueError(f"column {k!r} has {len(v)} values for the {len(source)} records of "
                         f"{source!r}")
    self.source, self.columns = source, columns

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    return dict(self.source[index], **{k: v[index] for k, v in self.columns.items()})

  def __repr__(self) -> str:
    return f"WithColumns({self.source!r}, {sorted(self.columns)})"
