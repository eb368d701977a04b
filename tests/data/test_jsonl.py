"""JSONL readers: records, file:line errors, skip counts, HH split, real data."""

import gzip
import json
import pathlib
import re

import pytest

from rlhf_jax.data import jsonl

SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
HH_PATH = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
ALPACA_PATH = SHARED / "alpaca-seed-tasks" / "seed_tasks.jsonl"


def _write(path, lines):
  """Writes raw lines (str: written as is; anything else: json.dumps)."""
  text = "\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n"
  if str(path).endswith(".gz"):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    pathlib.Path(path).write_text(text, encoding="utf-8")
  return str(path)


def test_demonstrations_and_stats(tmp_path):
  path = _write(tmp_path / "d.jsonl", [
      {"prompt": "2+2=", "response": "4"}, "", {"prompt": "", "response": "héllo"}])
  records, stats = jsonl.read("demonstration", path)
  assert records == [{"prompt": "2+2=", "response": "4"}, {"prompt": "", "response": "héllo"}]
  assert stats == {"path": path, "lines": 2, "records": 2, "skipped": 0, "errors": []}


GOOD_DEMO = {"prompt": "p", "response": "r"}
GOOD_PREF = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("fmt,bad,message", [
    ("demonstration", '{"prompt": "p", "response": ', "invalid JSON"),
    ("demonstration", "[1, 2]", "expected a JSON object, got list"),
    ("demonstration", {"prompt": "p"}, "missing key 'response'"),
    ("demonstration", {"prompt": 3, "response": "r"}, "key 'prompt': expected str, got int"),
    ("demonstration", {"prompt": "p", "response": " \n"}, "key 'response': empty"),
    ("preference", {"prompt": "p", "chosen": "a"}, "missing key 'rejected'"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": "a"},
     "chosen and rejected are identical"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": ""}, "key 'rejected': empty"),
    ("preference", {**GOOD_PREF, "margin": "1"}, "key 'margin': expected int/float, got str"),
    ("preference", {**GOOD_PREF, "margin": True}, "key 'margin': expected int/float, got bool"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}',
     "key 'margin': not finite"),
    ("alpaca", {"instruction": "i", "instances": []}, "key 'instances': empty list"),
    ("alpaca", {"instruction": "i", "instances": [{"input": ""}]},
     "instances\\[0\\]: missing key 'output'"),
    ("hh", {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: ho"},
     "key 'chosen': no '\\\\n\\\\nAssistant:' turn"),
])
def test_errors_name_file_and_line(tmp_path, fmt, bad, message):
  good = {"demonstration": GOOD_DEMO, "preference": GOOD_PREF,
          "alpaca": {"instruction": "i", "instances": [{"input": "", "output": "o"}]},
          "hh": {"chosen": "\n\nHuman: q\n\nAssistant: a",
                 "rejected": "\n\nHuman: q\n\nAssistant: b"}}[fmt]
  # The bad record is on physical line 4 (line 2 is blank and still counted).
  path = _write(tmp_path / "x.jsonl", [good, "", good, bad, good])
  with pytest.raises(ValueError, match=f"^{re.escape(path)}:4: {message}"):
    jsonl.read(fmt, path)
  records, stats = jsonl.read(fmt, path, on_error="skip")
  assert len(records) == 3
  assert (stats["lines"], stats["records"], stats["skipped"]) == (4, 3, 1)
  assert len(stats["errors"]) == 1 and stats["errors"][0].startswith(f"{path}:4: ")


def test_invalid_utf8_names_line(tmp_path):
  path = tmp_path / "u.jsonl"
  path.write_bytes(json.dumps(GOOD_DEMO).encode() + b"\n" + b'{"prompt": "\xff"}\n')
  with pytest.raises(ValueError, match=f"^{re.escape(str(path))}:2: invalid UTF-8"):
    jsonl.read("demonstration", str(path))


def test_skip_keeps_first_errors_only(tmp_path):
  path = _write(tmp_path / "x.jsonl", ["nope"] * 25 + [GOOD_DEMO])
  records, stats = jsonl.read("demonstration", path, on_error="skip")
  assert records == [GOOD_DEMO]
  assert stats["skipped"] == 25 and len(stats["errors"]) == jsonl.MAX_KEPT_ERRORS
  assert stats["errors"][-1].startswith(f"{path}:{jsonl.MAX_KEPT_ERRORS}: invalid JSON")


def test_bad_arguments(tmp_path):
  path = _write(tmp_path / "x.jsonl", [GOOD_DEMO])
  with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
    jsonl.read("demonstration", path, on_error="ignore")
  with pytest.raises(ValueError, match="unknown JSONL format 'csv'"):
    jsonl.read("csv", path)


def test_preferences_margin_and_gzip(tmp_path):
  path = _write(tmp_path / "p.jsonl.gz", [
      GOOD_PREF, {**GOOD_PREF, "margin": 2}, {**GOOD_PREF, "margin": None}])
  stats = jsonl.new_stats(path)
  records = list(jsonl.read_preferences(path, stats=stats))
  assert [r["margin"] for r in records] == [0.0, 2.0, 0.0]
  assert all(isinstance(r["margin"], float) for r in records)
  assert records[0] == {**GOOD_PREF, "margin": 0.0}
  assert stats["records"] == 3


def test_alpaca_one_record_per_instance(tmp_path):
  path = _write(tmp_path / "seed.jsonl", [
      {"id": "t0", "instruction": "Add.", "is_classification": False,
       "instances": [{"input": "1 2", "output": "3"}, {"input": "", "output": "0"}]},
      {"id": "t1", "instruction": "Say hi.", "is_classification": False,
       "instances": [{"input": "  ", "output": "hi"}]}])
  records, stats = jsonl.read("alpaca", path)
  assert records == [
      {"prompt": "Instruction: Add.\nInput: 1 2\nResponse: ", "response": "3"},
      {"prompt": "Instruction: Add.\nResponse: ", "response": "0"},
      {"prompt": "Instruction: Say hi.\nResponse: ", "response": "hi"}]
  assert (stats["lines"], stats["records"]) == (2, 3)


def test_split_hh_hand_made():
  prompt = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Help me.\n\nAssistant:"
  chosen, rejected = prompt + " Sure, here.", prompt + " No."
  assert jsonl.split_hh(chosen, rejected) == (prompt, " Sure, here.", " No.")
  records = jsonl.parse_hh({"chosen": chosen, "rejected": rejected})
  assert records == [{"prompt": prompt, "chosen": " Sure, here.", "rejected": " No.",
                      "margin": 0.0}]


@pytest.mark.parametrize("chosen,rejected,message", [
    ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: X\n\nAssistant: c", "do not share the prompt"),
    ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: c\n\nHuman: d",
     "key 'rejected': the response after the shared prompt holds another dialogue turn"),
    ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: b", "identical"),
    ("\n\nHuman: a\n\nAssistant:", "\n\nHuman: a\n\nAssistant: c", "key 'chosen': empty"),
])
def test_split_hh_malformed(chosen, rejected, message):
  with pytest.raises(jsonl.RecordError, match=message):
    jsonl.parse_hh({"chosen": chosen, "rejected": rejected})


@pytest.mark.skipif(not HH_PATH.exists(), reason=f"{HH_PATH} absent")
def test_real_hh_harmless_base_test():
  records, stats = jsonl.read("hh", str(HH_PATH), on_error="skip")
  # 2312 pairs; 9 are malformed: 4 empty chosen responses, 4 whose rejected dialogue
  # does not share the chosen prompt, 1 whose rejected response holds an extra turn.
  assert (stats["lines"], stats["records"], stats["skipped"]) == (2312, 2303, 9)
  with gzip.open(HH_PATH, "rt", encoding="utf-8") as f:
    raw = [json.loads(l) for l in f]
  bad = {int(e[len(str(HH_PATH)) + 1:].split(":")[0]) for e in stats["errors"]}
  assert sorted(bad) == [87, 517, 926, 1104, 1255, 1689, 1951, 1953, 2037]
  kept = [r for i, r in enumerate(raw, start=1) if i not in bad]
  assert len(kept) == len(records)
  for r, k in zip(records, kept):
    assert r["prompt"].endswith("\n\nAssistant:") and r["prompt"].startswith("\n\nHuman:")
    assert r["prompt"] + r["chosen"] == k["chosen"]
    assert r["prompt"] + r["rejected"] == k["rejected"]
  with pytest.raises(ValueError, match=f"^{re.escape(str(HH_PATH))}:87: key 'chosen': empty"):
    jsonl.read("hh", str(HH_PATH))


@pytest.mark.skipif(not ALPACA_PATH.exists(), reason=f"{ALPACA_PATH} absent")
def test_real_alpaca_seed_tasks():
  records, stats = jsonl.read("alpaca", str(ALPACA_PATH))
  with open(ALPACA_PATH, encoding="utf-8") as f:
    raw = [json.loads(l) for l in f if l.strip()]
  assert stats["lines"] == len(raw) == 175 and stats["skipped"] == 0
  assert len(records) == sum(len(t["instances"]) for t in raw)
  first = raw[0]["instances"][0]
  assert records[0]["response"] == first["output"]
  assert records[0]["prompt"].startswith(f"Instruction: {raw[0]['instruction']}\n")


def test_truncated_gzip_names_the_file(tmp_path):
  path = _write(tmp_path / "d.jsonl.gz", [{"prompt": f"p{i}", "response": "r" * 50}
                                          for i in range(400)])
  data = pathlib.Path(path).read_bytes()
  pathlib.Path(path).write_bytes(data[:len(data) // 2])      # a copy cut short
  with pytest.raises(ValueError, match=re.escape(path) + r": truncated or corrupt file after "
                                       r"line \d+ \(EOFError"):
    jsonl.read("demonstration", path)
