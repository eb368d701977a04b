"""TFDS array_record datasets and grain pipelines: order, resume, sharding, eval."""

import json
import os
import pathlib

import numpy as np
import pytest

from rlhf_jax import tokenizers
from rlhf_jax.data import collate, jsonl, pipeline, tfds_builders

HH_PATH = (pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" /
           "harmless-base-test.jsonl.gz")


def _ident(record):
  return {"x": np.int32(record)}


def _drop_multiples_of_5(record):
  return None if record % 5 == 0 else {"x": np.int32(record), "y": np.full([2], record, np.int32)}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for bx, by in zip(xs, ys):
    assert sorted(bx) == sorted(by)
    for k in bx:
      np.testing.assert_array_equal(bx[k], by[k])


# ---------------------------------------------------------------- train iterator


def test_epochs_are_permutations_and_reshuffled():
  it = pipeline.make_train_iterator(list(range(12)), _ident, batch_size=4, seed=3)
  epochs = [np.concatenate([b["x"] for b in _take(it, 3)]) for _ in range(3)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(12))
  assert epochs[0].tolist() != list(range(12))           # shuffled
  assert epochs[0].tolist() != epochs[1].tolist()        # a new order each epoch
  assert epochs[1].tolist() != epochs[2].tolist()
  b = next(it)
  assert b["x"].shape == (4,) and b["x"].dtype == np.int32


def test_same_seed_same_order_other_seed_other_order():
  src = list(range(50))
  first = lambda seed: np.concatenate(
      [b["x"] for b in _take(pipeline.make_train_iterator(src, _ident, 5, seed=seed), 10)])
  assert first(0).tolist() == first(0).tolist()
  assert first(0).tolist() != first(1).tolist()
  assert first(1).tolist() != first(2).tolist()


@pytest.mark.parametrize("num_threads", [0, 2])
def test_resume_from_json_state_gives_the_same_batches(num_threads):
  src = list(range(23))  # not a multiple of the batch: batches straddle epochs
  kw = dict(batch_size=4, seed=7, num_threads=num_threads, prefetch=8 if num_threads else 0)
  it = pipeline.make_train_iterator(src, _drop_multiples_of_5, **kw)
  _take(it, 5)
  state = json.dumps(it.get_state())
  expected = _take(it, 20)
  expected_stats = it.stats
  resumed = pipeline.make_train_iterator(src, _drop_multiples_of_5, **kw)
  resumed.set_state(json.loads(state))
  _assert_batches_equal(_take(resumed, 20), expected)
  assert resumed.stats == expected_stats
  assert expected_stats["examples"] == 25 * 4 and expected_stats["dropped"] > 0


def test_dropped_count_is_exact():
  # Uninterrupted run without sharding: count Nones over the records read, by hand.
  src = list(range(23))
  it = pipeline.make_train_iterator(src, _ident, batch_size=4, seed=1)
  order = np.concatenate([b["x"] for b in _take(it, 30)])  # 120 records
  it = pipeline.make_train_iterator(src, _drop_multiples_of_5, batch_size=4, seed=1)
  got = np.concatenate([b["x"] for b in _take(it, 10)])    # 40 examples
  kept = order[order % 5 != 0]
  np.testing.assert_array_equal(got, kept[:40])
  read = int(np.searchsorted(np.cumsum(order % 5 != 0), 40)) + 1  # records until the 40th
  assert it.stats == {"batches": 10, "examples": 40, "dropped": read - 40, "records_read": read}


def test_resume_rejects_other_config():
  it = pipeline.make_train_iterator(list(range(10)), _ident, 2, seed=0)
  next(it)
  other = pipeline.make_train_iterator(list(range(10)), _ident, 2, seed=1)
  with pytest.raises(ValueError, match="iterator state was saved with"):
    other.set_state(it.get_state())


def test_shards_split_the_global_batch():
  src = list(range(40))
  single = _take(pipeline.make_train_iterator(src, _ident, 8, seed=5), 12)
  shards = [_take(pipeline.make_train_iterator(src, _ident, 8, seed=5, shard_index=i,
                                               shard_count=2), 12) for i in range(2)]
  for step in range(12):
    a, b = shards[0][step]["x"], shards[1][step]["x"]
    assert a.shape == b.shape == (4,)
    # Process i holds global-stream elements i, i+2, ...: interleaving gives the global batch.
    np.testing.assert_array_equal(np.stack([a, b], axis=1).reshape(-1), single[step]["x"])
  epoch = np.concatenate([s[t]["x"] for s in shards for t in range(5)])
  assert sorted(epoch.tolist()) == src  # disjoint shards that cover the epoch


def test_bad_arguments():
  src = list(range(10))
  with pytest.raises(ValueError, match="batch_size=6 must be a positive multiple of shard_count=4"):
    pipeline.make_train_iterator(src, _ident, 6, seed=0, shard_index=0, shard_count=4)
  with pytest.raises(ValueError, match=r"shard_index=2 must be in \[0, shard_count=2\)"):
    pipeline.make_train_iterator(src, _ident, 4, seed=0, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    pipeline.make_train_iterator(src, _ident, 4, seed=-1)
  it = pipeline.make_train_iterator(src, lambda r: None, 4, seed=0)
  with pytest.raises(ValueError, match="no record fits"):
    next(it)


# ---------------------------------------------------------------- eval batches


def test_eval_batches_in_order_padded_with_valid():
  batches, stats = pipeline.make_eval_batches(list(range(13)), _drop_multiples_of_5, 4)
  # Kept in order: 1 2 3 4 | 6 7 8 9 | 11 12 (+ 2 copies of 12, valid 0).
  np.testing.assert_array_equal(np.stack([b["x"] for b in batches]),
                                [[1, 2, 3, 4], [6, 7, 8, 9], [11, 12, 12, 12]])
  np.testing.assert_array_equal(np.stack([b["valid"] for b in batches]),
                                [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
  assert batches[0]["valid"].dtype == np.int32 and batches[2]["y"].shape == (4, 2)
  assert stats == {"records_read": 13, "dropped": 3, "examples": 10, "padded": 2, "batches": 3}
  again, _ = pipeline.make_eval_batches(list(range(13)), _drop_multiples_of_5, 4)
  _assert_batches_equal(again, batches)


def test_eval_batches_drop_remainder_max_batches_and_shards():
  src = list(range(13))
  batches, stats = pipeline.make_eval_batches(src, _ident, 4, drop_remainder=True)
  assert len(batches) == 3 and stats["examples"] == 12 and stats["padded"] == 0
  batches, stats = pipeline.make_eval_batches(src, _ident, 4, max_batches=2)
  assert [b["x"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert stats["records_read"] == 8
  rows = [pipeline.make_eval_batches(src, _ident, 4, shard_index=i, shard_count=2)[0]
          for i in range(2)]
  assert len(rows[0]) == len(rows[1]) == 4
  assert [b["x"].tolist() for b in rows[1]] == [[2, 3], [6, 7], [10, 11], [12, 12]]
  assert [b["valid"].tolist() for b in rows[1]] == [[1, 1], [1, 1], [1, 1], [0, 0]]
  with pytest.raises(ValueError, match="no record of .* fits"):
    pipeline.make_eval_batches(src, lambda r: None, 4)


# ---------------------------------------------------------------- TFDS datasets


def _pref_records(n=6):
  return [{"prompt": f"p{i} é", "chosen": f"good {i}", "rejected": f"bad {i}",
           "margin": float(i) / 2} for i in range(n)]


def test_prepare_load_round_trip(tmp_path):
  recs = _pref_records()
  d = tfds_builders.prepare("preference", "toy", {"train": lambda: recs, "test": lambda: recs[:2]},
                            str(tmp_path), metadata={"source": "hand"})
  assert d == os.path.join(str(tmp_path), "preference", "toy", "1.0.0")
  sources = tfds_builders.load(d, "preference")
  assert sorted(sources) == ["test", "train"] and len(sources["test"]) == 2
  assert [sources["train"][i] for i in range(6)] == recs  # generation order, str decoded
  assert sources["train"].__getitems__([4, 1]) == [recs[4], recs[1]]
  assert tfds_builders.read_metadata(d) == {"kind": "preference", "source": "hand",
                                            "with_scores": False}
  with pytest.raises(ValueError, match=f"{d}: expected a 'demonstration' dataset, found 'preference'"):
    tfds_builders.load(d, "demonstration")


def test_prepare_is_idempotent_and_byte_identical(tmp_path):
  splits = {"train": lambda: _pref_records(50)}
  d1 = tfds_builders.prepare("preference", "toy", splits, str(tmp_path / "a"))
  calls = []
  def must_not_run():
    calls.append(1)
    return []
  assert tfds_builders.prepare("preference", "toy", {"train": must_not_run},
                               str(tmp_path / "a")) == d1
  assert not calls
  with pytest.raises(ValueError, match="already prepared with metadata"):
    tfds_builders.prepare("preference", "toy", splits, str(tmp_path / "a"), metadata={"v": 2})
  d2 = tfds_builders.prepare("preference", "toy", splits, str(tmp_path / "b"))
  files = sorted(os.listdir(d1))
  assert files == sorted(os.listdir(d2))
  assert any(f.endswith(".array_record-00000-of-00001") for f in files)
  for name in files:  # dataset_info.json included: TFDS writes no timestamp into it
    assert pathlib.Path(d1, name).read_bytes() == pathlib.Path(d2, name).read_bytes(), name


def test_prepare_other_kinds_and_scores(tmp_path):
  d = tfds_builders.prepare("demonstration", "demo", {"train": lambda: [
      {"prompt": "a", "response": "b"}]}, str(tmp_path))
  assert tfds_builders.load(d)["train"][0] == {"prompt": "a", "response": "b"}
  d = tfds_builders.prepare("text", "t", {"train": lambda: [{"text": "x"}]}, str(tmp_path))
  assert tfds_builders.load(d, "text")["train"][0] == {"text": "x"}
  d = tfds_builders.prepare("prompt", "q", {"train": lambda: [{"prompt": "x"}]}, str(tmp_path))
  assert tfds_builders.load(d, "prompt")["train"][0] == {"prompt": "x"}
  d = tfds_builders.prepare("preference", "scored", {"train": lambda: [
      {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 0.25,
       "rejected_score": -1}]}, str(tmp_path), with_scores=True)
  assert tfds_builders.load(d, "preference")["train"][0] == {
      "prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.0, "chosen_score": 0.25,
      "rejected_score": -1.0}


@pytest.mark.parametrize("record,message", [
    ({"prompt": "p", "chosen": "a"}, "record 1: missing key 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "record 1: key 'rejected': expected str"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": float("nan")},
     "record 1: key 'margin': not finite"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "score": 1.0},
     r"record 1: unknown keys \['score'\]"),
])
def test_prepare_rejects_bad_records(tmp_path, record, message):
  good = {"prompt": "p", "chosen": "a", "rejected": "b"}
  with pytest.raises(ValueError, match=f"dataset 'bad' split 'train' {message}"):
    tfds_builders.prepare("preference", "bad", {"train": lambda: [good, record]}, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "preference", "bad", "1.0.0"))


def test_prepare_and_load_errors(tmp_path):
  with pytest.raises(ValueError, match="dataset 'e': split 'test' is empty"):
    tfds_builders.prepare("prompt", "e", {"train": lambda: [{"prompt": "x"}], "test": lambda: []},
                          str(tmp_path))
  with pytest.raises(ValueError, match="unknown dataset kind 'chat'"):
    tfds_builders.prepare("chat", "c", {"train": list}, str(tmp_path))
  with pytest.raises(ValueError, match="dataset name 'a/b'"):
    tfds_builders.prepare("prompt", "a/b", {"train": list}, str(tmp_path))
  with pytest.raises(ValueError, match="metadata key 'kind' is reserved"):
    tfds_builders.prepare("prompt", "k", {"train": list}, str(tmp_path), metadata={"kind": 1})
  with pytest.raises(ValueError, match="with_scores applies to kind 'preference' only"):
    tfds_builders.prepare("prompt", "k", {"train": list}, str(tmp_path), with_scores=True)
  with pytest.raises(ValueError, match=f"{tmp_path}: not a dataset prepared by rlhf_jax"):
    tfds_builders.load(str(tmp_path))


def test_tfds_source_through_the_train_pipeline(tmp_path):
  tok = tokenizers.ByteTokenizer()
  recs = _pref_records(20) + [{"prompt": "p", "chosen": "x" * 40, "rejected": "y"}]  # too long
  d = tfds_builders.prepare("preference", "toy", {"train": lambda: recs}, str(tmp_path))
  src = tfds_builders.load(d, "preference")["train"]
  transform = collate.make_transform("preference", tok, seq_len=16)
  it = pipeline.make_train_iterator(src, transform, batch_size=4, seed=0)
  batches = _take(it, 10)  # 40 examples > 20 that fit: the long pair is met and dropped
  assert it.stats["dropped"] >= 1
  assert it.stats["records_read"] == 40 + it.stats["dropped"]
  b = batches[0]
  assert b["chosen_tokens"].shape == (4, 16) and b["margin"].shape == (4,)
  assert b["margin"].dtype == np.float32
  for i in range(4):  # every row is a record of the source, collated
    text = tok.decode(b["chosen_tokens"][i])
    rec = next(r for r in recs if r["prompt"] + r["chosen"] == text)
    _assert_batches_equal([{k: v[i] for k, v in b.items()}],
                          [collate.preference_example(tok, rec["prompt"], rec["chosen"],
                                                      rec["rejected"], 16, rec["margin"])])


@pytest.mark.skipif(not HH_PATH.exists(), reason=f"{HH_PATH} absent")
def test_real_hh_prepared_and_batched(tmp_path):
  stats = jsonl.new_stats(HH_PATH)
  d = tfds_builders.prepare(
      "preference", "hh_harmless_base_test",
      {"test": lambda: jsonl.read_hh(HH_PATH, on_error="skip", stats=stats)}, str(tmp_path))
  assert stats["records"] == 2303
  src = tfds_builders.load(d, "preference")["test"]
  assert len(src) == 2303
  transform = collate.make_transform("preference", tokenizers.ByteTokenizer(), seq_len=128)
  batches, eval_stats = pipeline.make_eval_batches(src, transform, 32, max_batches=4)
  assert len(batches) == 4 and batches[0]["chosen_tokens"].shape == (32, 128)
  assert eval_stats["examples"] == 128
  assert eval_stats["records_read"] == 128 + eval_stats["dropped"]


def test_split_smaller_than_a_batch_warns(caplog):
  with caplog.at_level("WARNING"):
    it = pipeline.make_train_iterator(list(range(3)), _ident, batch_size=8, seed=0)
  assert "has 3 records, fewer than one batch of 8: every batch repeats records" in caplog.text
  assert sorted(next(it)["x"].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2]   # what the warning means
  caplog.clear()
  with caplog.at_level("WARNING"):
    pipeline.make_train_iterator(list(range(8)), _ident, batch_size=8, seed=0)
  assert "fewer than one batch" not in caplog.text
