"""Tokenizers behind one interface: byte-level (no file) and Hugging Face tokenizer.json.

`encode` never adds special tokens (collation places BOS/EOS itself); `decode` drops
them. Ids are plain Python ints.
"""

import dataclasses
import os
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
  """What the rest of rlhf_jax needs from a tokenizer."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without special tokens."""

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text, special tokens dropped."""


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes: pad=0, bos=1, eos=2, byte b -> b + 3; vocab_size 259.

  `decode` drops the special ids and any id >= 259 (a model vocabulary padded to a
  multiple of 8 can sample them) and replaces invalid UTF-8 with U+FFFD.
  """

  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  offset: int = 3
  vocab_size: int = 259

  def encode(self, text: str) -> list[int]:
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return (data.astype(np.int64) + self.offset).tolist()

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= self.offset) & (ids < self.offset + 256)]
    return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# Names looked up among a tokenizer.json's special tokens, in order of preference.
_SPECIAL_NAMES = {
    "pad": ("<pad>", "<|pad|>", "[PAD]", "<|padding|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
}


class JsonTokenizer:
  """A Hugging Face `tokenizer.json`, loaded with the `tokenizers` library.

  pad/bos/eos ids come from the arguments, or else are looked up by name among the
  file's special tokens (`<pad>`, `<s>`, `</s>`, `<|endoftext|>`, ...).
  """

  def __init__(self, path: str, *, pad_id: int | None = None,
               bos_id: int | None = None, eos_id: int | None = None):
    import tokenizers  # pylint: disable=g-import-not-at-top
    if not path or not os.path.isfile(path):
      raise ValueError(f"tokenizer.path: no tokenizer.json at {path!r}")
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception on bad JSON
      raise ValueError(f"tokenizer.path: cannot load {path!r}: {e}") from e
    self.path = path
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()
                if t.special}
    given = {"pad": pad_id, "bos": bos_id, "eos": eos_id}
    for role, names in _SPECIAL_NAMES.items():
      value = given[role]
      if value is None:
        value = next((specials[n] for n in names if n in specials), None)
        if value is None:
          raise ValueError(
              f"{path}: cannot find a {role} token among the special tokens "
              f"{sorted(specials)} (looked for {list(names)}); pass {role}_id=")
      if not 0 <= int(value) < self.vocab_size:
        raise ValueError(f"{path}: {role}_id={value} outside the vocabulary "
                         f"[0, {self.vocab_size})")
      setattr(self, f"{role}_id", int(value))

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    ids = [i for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)]
    return self._tok.decode(ids, skip_special_tokens=True)

  def __repr__(self):
    return (f"JsonTokenizer({self.path!r}, vocab_size={self.vocab_size}, "
            f"pad_id={self.pad_id}, bos_id={self.bos_id}, eos_id={self.eos_id})")


def make_tokenizer(config: Any) -> Tokenizer:
  """`config`: `config.tokenizer` (kind, path, optional pad_id/bos_id/eos_id) or a dict."""
  kind = config.get("kind", "byte")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "json":
    ids = {k: config.get(k) for k in ("pad_id", "bos_id", "eos_id")}
    return JsonTokenizer(config.get("path", ""), **ids)
  raise ValueError(f"tokenizer.kind: unknown kind {kind!r} (expected 'byte' or 'json')")
