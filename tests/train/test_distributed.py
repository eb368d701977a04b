"""Multi-host: 2 processes x 4 CPU devices train exactly as 1 process x 8 devices.

The workers (tests/train/multiprocess_worker.py) join through jax.distributed on
127.0.0.1 and run the real loop: each reads its own shard of the data, steps the
one SPMD program, is killed, resumes from the collective checkpoint, evaluates.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from configs import base
from rlhf_jax.stages import dpo
from rlhf_jax.stages import reward
from rlhf_jax.stages import sft
from rlhf_jax.train import distributed
from rlhf_jax.train import loop
from tests.train import multiprocess_worker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "train", "multiprocess_worker.py")

TINY = {f"model.{k}": v for k, v in base.model_config("tiny").items()}
COMMON = dict(TINY, **{"model.num_layers": 1, "train.log_every": 1, "train.eval_every": 0,
                       "optimizer.warmup_steps": 2, "data.batch_size": 8,
                       "data.eval_batch_size": 8})
# seq_len 112 drops no testbed demonstration in the first batches: a dropped example
# shifts one process's stream, and the global batch would no longer be the 1-process one.
SFT = dict(COMMON, **{"data.corpus_train": 300, "data.corpus_test": 40, "data.seq_len": 112,
                      "train.eval_batches": 2, "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
DPO = dict(COMMON, **{"data.source": "jsonl", "data.seq_len": 64, "data.on_error": "raise",
                      "train.eval_batches": 0, "optimizer.learning_rate": 1e-3,
                      "mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1})
# Bradley-Terry is blind to a constant shift of the rewards, so without centring the
# scalar head's bias gets a zero gradient up to rounding, which Adam normalises into
# lr-sized steps of either sign: centring makes the bias (and the rewards) well defined.
REWARD = dict(DPO, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                      "reward_model.center_coef": 0.01})
STAGES = {"sft": (sft, SFT), "dpo": (dpo, DPO), "reward": (reward, REWARD)}


def write_pairs(path, n=48):
  """A tiny preference file: chosen praises, rejected pans, each pair its own prompt."""
  rng = np.random.default_rng(0)
  words = ["plot", "cast", "score", "pacing", "ending", "dialogue"]
  with open(path, "w") as f:
    for i in range(n):
      w = words[rng.integers(len(words))]
      f.write(json.dumps({"prompt": f"Review {i}: the {w}", "chosen": " was wonderful.",
                          "rejected": " was dull" + "l" * int(rng.integers(3))}) + "\n")


def train_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  return [r for r in records if r["split"] == "train"]


def launch(spec, tmp_path, timeout):
  """Runs the spec's jobs in 2 worker processes; returns when both exit 0."""
  spec = dict(spec, coordinator=f"127.0.0.1:{portpicker.pick_unused_port()}",
              num_processes=2, local_devices=4)
  spec_path = tmp_path / "spec.json"
  spec_path.write_text(json.dumps(spec))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, WORKER, str(spec_path), str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"worker {i} exited {p.returncode}:\n{out[-6000:]}"


def check_two_processes_equal_one(tmp_path, names, num_steps, checkpoint_every, kill_before):
  """The losses, grad norms and final eval of 2 x 4 devices (killed, resumed) == 1 x 8 devices."""
  assert jax.device_count() == 8 and jax.process_count() == 1
  pairs = tmp_path / "pairs.jsonl"
  write_pairs(pairs)
  runs = {name: dict(STAGES[name][1], **{
      "train.num_steps": num_steps, "train.checkpoint_every": checkpoint_every,
      "data.train_file": str(pairs) if name != "sft" else ""}) for name in names}
  reference = {}
  for name, overrides in runs.items():
    config = multiprocess_worker.make_config(name, dict(overrides, **{
        "data.data_dir": str(tmp_path / "data")}))
    workdir = str(tmp_path / f"{name}_1proc")
    reference[name] = (loop.train(config, workdir, STAGES[name][0]), train_records(workdir))

  # The SFT and reward workers reuse the prepared datasets; the DPO workers prepare
  # their own (process 0 first, then process 1 finds it).
  jobs = [{"kind": "train", "stage": name, "workdir": str(tmp_path / f"{name}_2proc"),
           "kill_before_step": kill_before,
           "overrides": dict(overrides, **{"data.data_dir": str(tmp_path / (
               "data_2proc" if name == "dpo" else "data"))})}
          for name, overrides in runs.items()]
  launch({"jobs": jobs, "cache_dir": str(tmp_path / "jax_cache")}, tmp_path, timeout=300)

  for job in jobs:
    name, workdir = job["stage"], job["workdir"]
    ref_eval, ref_records = reference[name]
    records = train_records(workdir)
    assert [r["step"] for r in records] == list(range(1, num_steps + 1)), name
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose([r[key] for r in records], [r[key] for r in ref_records],
                                 rtol=1e-5, atol=1e-5, err_msg=f"{name} {key}")
    assert records[0]["loss"] != records[-1]["loss"]      # it trained
    for pid in range(2):
      with open(os.path.join(workdir, f"eval_{pid}.json")) as f:
        evals = json.load(f)
      assert set(evals) == set(ref_eval), name
      for k, v in ref_eval.items():
        if isinstance(v, (list, str)):   # sampled texts
          assert evals[k] == v, f"{name} eval {k}"
        else:
          np.testing.assert_allclose(evals[k], v, rtol=1e-5, atol=1e-5, err_msg=f"{name} eval {k}")
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    last_saved = (kill_before - 1) // checkpoint_every * checkpoint_every
    assert steps == [last_saved, num_steps], steps
  if "dpo" in names:
    assert os.path.isdir(tmp_path / "data_2proc" / "preference")


def test_two_processes_equal_one_process_short(tmp_path):
  """DPO, 3 steps: killed before step 3, resumed from step 2 (CI's short variant)."""
  check_two_processes_equal_one(tmp_path, ["dpo"], num_steps=3, checkpoint_every=2,
                                kill_before=3)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  """SFT (mesh 1x4x2: FSDP across the processes), DPO (8-way data parallel) and reward
  (2x2x2), 10 steps: killed before step 7 (step 6 logged, not saved), resumed from step 5."""
  check_two_processes_equal_one(tmp_path, ["sft", "dpo", "reward"], num_steps=10,
                                checkpoint_every=5, kill_before=7)


def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path):
  """JAX's preemption sync point: both processes save the same step and stop."""
  workdir = str(tmp_path / "toy")
  overrides = {"data.batch_size": 8, "train.num_steps": 5000, "train.log_every": 100,
               "train.eval_every": 0, "train.checkpoint_every": 0}
  launch({"jobs": [{"kind": "sigterm", "workdir": workdir, "signal_at": 5,
                    "overrides": overrides}]}, tmp_path, timeout=120)
  results = [json.load(open(os.path.join(workdir, f"result_{i}.json"))) for i in range(2)]
  assert results[0] == results[1], results
  stopped = results[0]["preempted_at"]
  assert results[0]["exit_status"] == 143
  assert 5 < stopped < 5000
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]


def test_initialize_validates_flags():
  assert not distributed.initialize()          # no flags, no cluster: single process
  with pytest.raises(ValueError, match="--coordinator_address, --process_id"):
    distributed.initialize(num_processes=2)
  with pytest.raises(ValueError, match="host:port"):
    distributed.initialize("localhost", 2, 0)
  with pytest.raises(ValueError, match="--process_id"):
    distributed.initialize("localhost:1234", 2, 2)
  with pytest.raises(ValueError, match="--local_device_ids"):
    distributed.initialize("localhost:1234", 2, 0, "0,x")


def test_single_process_helpers():
  assert distributed.allgather_json({"a": [1, 2]}) == [{"a": [1, 2]}]
  assert distributed.global_sum(3.5) == 3.5
  assert distributed.process_zero_first(lambda: 7) == 7
  with distributed.preemption_watch() as stop:
    assert not stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop(2)
