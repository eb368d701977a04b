"""Records -> prepared TFDS datasets in array_record files (no TensorFlow), and back.

A dataset lives in `<data_dir>/<kind>/<name>/<version>/`, one array_record file set per
split, records in the order they were generated (shuffling is the pipeline's job).
`prepare` is idempotent: a dataset already prepared under the same name is reused,
so the name must identify the records (e.g. include the source file and settings).

  kind           fields (text: str, others: float32)
  text           text
  demonstration  prompt, response
  preference     prompt, chosen, rejected, margin (default 0) [, chosen_score, rejected_score]
  prompt         prompt
"""

import json
import math
import os
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import tensorflow_datasets as tfds

KINDS = {
    "text": ("text",),
    "demonstration": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected", "margin"),
    "prompt": ("prompt",),
}
SCORE_FIELDS = ("chosen_score", "rejected_score")
FLOAT_FIELDS = ("margin",) + SCORE_FIELDS
_DEFAULTS = {"margin": 0.0}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def _fields(kind: str, with_scores: bool) -> tuple[str, ...]:
  if kind not in KINDS:
    raise ValueError(f"unknown dataset kind {kind!r} (expected one of {sorted(KINDS)})")
  if with_scores and kind != "preference":
    raise ValueError(f"with_scores applies to kind 'preference' only, not {kind!r}")
  return KINDS[kind] + (SCORE_FIELDS if with_scores else ())


def _check_record(record: Any, fields: tuple[str, ...], where: str) -> dict[str, Any]:
  """Validates one record and fills defaults; `where` names it in errors."""
  if not isinstance(record, Mapping):
    raise ValueError(f"{where}: expected a dict, got {type(record).__name__}")
  unknown = set(record) - set(fields)
  if unknown:
    raise ValueError(f"{where}: unknown keys {sorted(unknown)} (expected {list(fields)})")
  out = {}
  for key in fields:
    if key not in record:
      if key not in _DEFAULTS:
        raise ValueError(f"{where}: missing key {key!r}")
      out[key] = _DEFAULTS[key]
      continue
    value = record[key]
    if key in FLOAT_FIELDS:
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where}: key {key!r}: expected a number, got {type(value).__name__}")
      if not math.isfinite(value):
        raise ValueError(f"{where}: key {key!r}: not finite ({value})")
      out[key] = np.float32(value)
    elif not isinstance(value, str):
      raise ValueError(f"{where}: key {key!r}: expected str, got {type(value).__name__}")
    else:
      out[key] = value
  return out


class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the records of `splits[name]()` for each split; `name` is the kind."""

  VERSION = tfds.core.Version("1.0.0")
  # No downloads, hence no checksums file to look up next to the code (the lookup
  # needs `importlib_resources` for classes inside a package).
  code_path = None

  def __init__(self, *, splits: Mapping[str, Callable[[], Iterable[dict]]] | None = None,
               metadata: dict | None = None, with_scores: bool = False, **kwargs):
    self._splits = splits or {}
    self._metadata = metadata or {}
    self._record_fields = _fields(self.name, with_scores)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {k: tfds.features.Scalar(np.float32) if k in FLOAT_FIELDS
                else tfds.features.Text() for k in self._record_fields}
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(self._metadata), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, make) for split, make in self._splits.items()}

  def _generate_examples(self, split, make_records):
    count = 0
    for count, record in enumerate(make_records(), start=1):
      yield count - 1, _check_record(
          record, self._record_fields, f"dataset {self.builder_config.name!r} split "
          f"{split!r} record {count - 1}")
    if count == 0:
      raise ValueError(f"dataset {self.builder_config.name!r}: split {split!r} is empty")


class TextBuilder(_RecordsBuilder, skip_registration=True):
  name = "text"


class DemonstrationBuilder(_RecordsBuilder, skip_registration=True):
  name = "demonstration"


class PreferenceBuilder(_RecordsBuilder, skip_registration=True):
  name = "preference"


class PromptBuilder(_RecordsBuilder, skip_registration=True):
  name = "prompt"


BUILDERS = {b.name: b for b in (TextBuilder, DemonstrationBuilder, PreferenceBuilder,
                                PromptBuilder)}


def _json_roundtrip(metadata: dict, what: str) -> dict:
  try:
    return json.loads(json.dumps(metadata, sort_keys=True))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what}: metadata is not JSON-serialisable: {e}") from None


def prepare(kind: str, name: str, splits: Mapping[str, Callable[[], Iterable[dict]]],
            data_dir: str, metadata: dict | None = None, version: str = "1.0.0",
            with_scores: bool = False) -> str:
  """Prepares (once) a dataset of `kind` from record factories; returns its directory.

  Args:
    kind: a key of KINDS.
    name: identifies the records; the directory is `<data_dir>/<kind>/<name>/<version>`.
    splits: split name -> zero-argument callable returning an iterable of records
      (dicts with exactly the fields of `kind`; `margin` may be left out).
    data_dir: root of prepared datasets.
    metadata: JSON-serialisable dict stored with the dataset (key 'kind' is reserved).
    version: "x.y.z".
    with_scores: preference datasets also carry `chosen_score`, `rejected_score`.
  """
  _fields(kind, with_scores)
  if not _NAME_RE.match(name or ""):
    raise ValueError(f"dataset name {name!r}: use letters, digits, '_', '-', '.'")
  if not splits:
    raise ValueError(f"dataset {name!r}: no splits given")
  metadata = dict(metadata or {})
  if "kind" in metadata:
    raise ValueError(f"dataset {name!r}: metadata key 'kind' is reserved")
  metadata = _json_roundtrip({**metadata, "kind": kind, "with_scores": with_scores},
                             f"dataset {name!r}")
  builder = BUILDERS[kind](
      splits=splits, metadata=metadata, with_scores=with_scores, data_dir=data_dir,
      file_format="array_record", config=tfds.core.BuilderConfig(name=name, version=version))
  dataset_dir = os.fspath(builder.data_dir)
  if os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
    found = read_metadata(dataset_dir)
    found_splits = set(tfds.builder_from_directory(dataset_dir).info.splits)
    if found != metadata or found_splits != set(splits):
      raise ValueError(
          f"{dataset_dir}: already prepared with metadata {found} and splits "
          f"{sorted(found_splits)}, now asked for {metadata} and {sorted(splits)}; "
          "use a new name (or delete the directory)")
    return dataset_dir
  builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
  return dataset_dir


def read_metadata(dataset_dir: str) -> dict:
  """The metadata dict stored by `prepare` (includes 'kind' and 'with_scores')."""
  path = os.path.join(dataset_dir, "metadata.json")
  if not os.path.isfile(path):
    raise ValueError(f"{dataset_dir}: not a dataset prepared by rlhf_jax (no metadata.json)")
  with open(path) as f:
    metadata = json.load(f)
  if metadata.get("kind") not in KINDS:
    raise ValueError(f"{dataset_dir}: metadata.json has no valid 'kind' ({metadata.get('kind')!r})")
  return metadata


class DataSource:
  """A split as a random-access sequence of records; Text features decoded to str."""

  def __init__(self, source, fields: tuple[str, ...], description: str):
    self._source = source
    self._text = tuple(k for k in fields if k not in FLOAT_FIELDS)
    self._description = description

  def _decode(self, record: dict) -> dict:
    return {k: v.decode("utf-8") if k in self._text else float(v) for k, v in record.items()}

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return self._decode(self._source[index])

  def __getitems__(self, indices) -> list[dict]:
    return [self._decode(r) for r in self._source.__getitems__(list(indices))]

  def __repr__(self) -> str:
    return f"DataSource({self._description}, {len(self)} records)"


def load(dataset_dir: str, kind: str | None = None) -> dict[str, DataSource]:
  """-> {split: DataSource}. Checks the kind (when given) and that no split is empty."""
  metadata = read_metadata(dataset_dir)
  if kind is not None and metadata["kind"] != kind:
    raise ValueError(f"{dataset_dir}: expected a {kind!r} dataset, found {metadata['kind']!r}")
  fields = _fields(metadata["kind"], metadata.get("with_scores", False))
  builder = tfds.builder_from_directory(dataset_dir)
  found = tuple(builder.info.features.keys())
  if set(found) != set(fields):
    raise ValueError(f"{dataset_dir}: features {sorted(found)} do not match kind "
                     f"{metadata['kind']!r} ({list(fields)})")
  for split, info in builder.info.splits.items():
    if info.num_examples == 0:
      raise ValueError(f"{dataset_dir}: split {split!r} is empty")
  sources = builder.as_data_source()
  return {split: DataSource(src, fields, f"{dataset_dir}[{split}]")
          for split, src in sources.items()}
