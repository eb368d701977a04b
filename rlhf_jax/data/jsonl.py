"""JSON-lines readers: demonstrations, Alpaca seed tasks, preferences, Anthropic HH.

Each reader is a generator of flat records (`{'prompt', 'response'}` or `{'prompt',
'chosen', 'rejected', 'margin'}`). A malformed line (invalid JSON, missing key, wrong
type, empty response, identical chosen and rejected) raises `ValueError('<file>:<line>:
...')` with `on_error='raise'`, or is skipped and counted with `on_error='skip'`.
Counts go into an optional `stats` dict (see `new_stats`) that the caller reports;
`read` returns records and stats together. Blank lines are ignored; `.gz` is read
transparently.
"""

import gzip
import json
import math
import zlib
from typing import Any, Callable, Iterator

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
MAX_KEPT_ERRORS = 10  # error messages kept in stats['errors'] for reporting


class RecordError(ValueError):
  """A malformed record; the reader adds file and line."""


def new_stats(path: str = "") -> dict[str, Any]:
  """lines: non-blank lines read; records: yielded; skipped: bad lines skipped."""
  return {"path": str(path), "lines": 0, "records": 0, "skipped": 0, "errors": []}


def _open(path: str):
  path = str(path)
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _lines(f, path: str) -> Iterator[tuple[int, bytes]]:
  """(line number, raw line); a truncated or corrupt compressed file is an error naming it."""
  lineno = 0
  try:
    for lineno, raw in enumerate(f, start=1):
      yield lineno, raw
  except (EOFError, OSError, zlib.error) as e:
    raise ValueError(f"{path}: truncated or corrupt file after line {lineno} "
                     f"({type(e).__name__}: {e})") from None


def _get(obj: dict, key: str, kind: type | tuple[type, ...] = str) -> Any:
  if key not in obj:
    raise RecordError(f"missing key {key!r} (keys: {sorted(obj)})")
  value = obj[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
    raise RecordError(f"key {key!r}: expected {names}, got {type(value).__name__}")
  return value


def _nonempty(value: str, key: str) -> str:
  if not value.strip():
    raise RecordError(f"key {key!r}: empty")
  return value


def read_jsonl(path: str, parse: Callable[[dict], list[dict]], *,
               on_error: str = "raise", stats: dict | None = None) -> Iterator[dict]:
  """Yields `parse(obj)` records for each line; `parse` raises RecordError on bad input."""
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  stats = new_stats(path) if stats is None else stats
  stats.setdefault("path", str(path))
  with _open(path) as f:
    for lineno, raw in _lines(f, path):
      if not raw.strip():
        continue
      stats["lines"] += 1
      try:
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise RecordError(f"invalid UTF-8: {e}") from None
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise RecordError(f"invalid JSON: {e}") from None
        if not isinstance(obj, dict):
          raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
        records = parse(obj)
      except RecordError as e:
        message = f"{path}:{lineno}: {e}"
        if on_error == "raise":
          raise ValueError(message) from None
        stats["skipped"] += 1
        if len(stats["errors"]) < MAX_KEPT_ERRORS:
          stats["errors"].append(message)
        continue
      for record in records:
        stats["records"] += 1
        yield record


def parse_demonstration(obj: dict) -> list[dict]:
  """`{"prompt", "response"}`; the prompt may be empty, the response may not."""
  prompt = _get(obj, "prompt")
  response = _nonempty(_get(obj, "response"), "response")
  return [{"prompt": prompt, "response": response}]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
  """"Instruction: ...\\nInput: ...\\nResponse: " (the Input line only when non-empty)."""
  if input_text.strip():
    return f"Instruction: {instruction}\nInput: {input_text}\nResponse: "
  return f"Instruction: {instruction}\nResponse: "


def parse_alpaca_seed_task(obj: dict) -> list[dict]:
  """Alpaca seed task -> one demonstration per instance."""
  instruction = _nonempty(_get(obj, "instruction"), "instruction")
  instances = _get(obj, "instances", list)
  if not instances:
    raise RecordError("key 'instances': empty list")
  records = []
  for i, instance in enumerate(instances):
    if not isinstance(instance, dict):
      raise RecordError(f"instances[{i}]: expected an object, got {type(instance).__name__}")
    try:
      input_text = _get(instance, "input")
      output = _nonempty(_get(instance, "output"), "output")
    except RecordError as e:
      raise RecordError(f"instances[{i}]: {e}") from None
    records.append({"prompt": alpaca_prompt(instruction, input_text), "response": output})
  return records


def _preference(prompt: str, chosen: str, rejected: str, margin: float) -> dict:
  _nonempty(chosen, "chosen")
  _nonempty(rejected, "rejected")
  if chosen == rejected:
    raise RecordError("chosen and rejected are identical")
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin}


def parse_preference(obj: dict) -> list[dict]:
  """`{"prompt", "chosen", "rejected"}` with an optional numeric `margin` (default 0)."""
  margin = 0.0
  if obj.get("margin") is not None:
    margin = float(_get(obj, "margin", (int, float)))
    if not math.isfinite(margin):
      raise RecordError(f"key 'margin': not finite ({margin})")
  return [_preference(_get(obj, "prompt"), _get(obj, "chosen"), _get(obj, "rejected"),
                      margin)]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
  """Splits two HH dialogues at the last "\\n\\nAssistant:" of `chosen`.

  Returns (prompt ending with "\\n\\nAssistant:", chosen response, rejected response);
  prompt + response reproduces each dialogue exactly. Raises RecordError when the
  dialogues do not share that prefix or a response holds another turn.
  """
  cut = chosen.rfind(HH_ASSISTANT)
  if cut < 0:
    raise RecordError(f"key 'chosen': no {HH_ASSISTANT!r} turn")
  prompt = chosen[:cut + len(HH_ASSISTANT)]
  if not rejected.startswith(prompt):
    raise RecordError("'chosen' and 'rejected' do not share the prompt up to the last "
                      f"{HH_ASSISTANT!r} turn of 'chosen'")
  responses = chosen[len(prompt):], rejected[len(prompt):]
  for key, response in zip(("chosen", "rejected"), responses):
    if HH_ASSISTANT in response or HH_HUMAN in response:
      raise RecordError(f"key {key!r}: the response after the shared prompt holds "
                        "another dialogue turn")
  return prompt, *responses


def parse_hh(obj: dict) -> list[dict]:
  """Anthropic HH `{"chosen", "rejected"}` dialogues -> shared prompt + two responses."""
  prompt, chosen, rejected = split_hh(_get(obj, "chosen"), _get(obj, "rejected"))
  return [_preference(prompt, chosen, rejected, 0.0)]


PARSERS = {
    "demonstration": parse_demonstration,
    "alpaca": parse_alpaca_seed_task,
    "preference": parse_preference,
    "hh": parse_hh,
}


def read_demonstrations(path, **kw) -> Iterator[dict]:
  return read_jsonl(path, parse_demonstration, **kw)


def read_alpaca_seed_tasks(path, **kw) -> Iterator[dict]:
  return read_jsonl(path, parse_alpaca_seed_task, **kw)


def read_preferences(path, **kw) -> Iterator[dict]:
  return read_jsonl(path, parse_preference, **kw)


def read_hh(path, **kw) -> Iterator[dict]:
  return read_jsonl(path, parse_hh, **kw)


def read(fmt: str, path: str, *, on_error: str = "raise") -> tuple[list[dict], dict]:
  """Reads a whole file of format `fmt` (a key of PARSERS) -> (records, stats)."""
  if fmt not in PARSERS:
    raise ValueError(f"unknown JSONL format {fmt!r} (expected one of {sorted(PARSERS)})")
  stats = new_stats(path)
  records = list(read_jsonl(path, PARSERS[fmt], on_error=on_error, stats=stats))
  return records, stats
