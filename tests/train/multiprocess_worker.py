"""One process of a multi-process CPU job, launched by tests/train/test_distributed.py.

  python tests/train/multiprocess_worker.py SPEC.json PROCESS_ID

SPEC: {"coordinator": "127.0.0.1:port", "num_processes": 2, "local_devices": 4,
       "jobs": [job, ...]}, each job one of
  {"kind": "train", "stage": "sft", "overrides": {dotted key: value}, "workdir": ...,
   "kill_before_step": 7}   the loop, killed (both processes) before that step and
                            resumed from the last checkpoint; writes eval_<pid>.json
  {"kind": "sigterm", "overrides": ..., "workdir": ..., "signal_at": 5}
                            the toy stage; SIGTERM reaches process 1 only at batch
                            `signal_at`; writes result_<pid>.json
"""

import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Killed(Exception):
  pass


def make_config(stage: str, overrides: dict):
  """configs/<stage>.py (configs/base.py for the toy stage) with dotted-key overrides."""
  import importlib
  module = importlib.import_module(f"configs.{'base' if stage == 'toy' else stage}")
  config = module.get_config()
  if stage == "toy":
    config.stage, config.nan_at = "example", 0
  config.update_from_flattened_dict(overrides)
  return config


def run_train(job: dict) -> dict:
  """loop.train; with `kill_before_step`, killed there (every process) and resumed."""
  import importlib
  import rlhf_jax.testbed  # noqa: F401  (registers the testbed's data source and gold reward)
  from rlhf_jax.data import pipeline
  from rlhf_jax.train import loop
  stage = importlib.import_module(f"rlhf_jax.stages.{job['stage']}")
  config = make_config(job["stage"], job["overrides"])
  kill = job.get("kill_before_step")
  if kill:
    original_next = pipeline.TrainIterator.__next__

    def next_until_kill(self):
      if self.stats["batches"] == kill - 1:
        raise Killed()
      return original_next(self)

    pipeline.TrainIterator.__next__ = next_until_kill
    try:
      loop.train(config, job["workdir"], stage)
      raise AssertionError("the run was not killed")
    except Killed:
      pass
    finally:
      pipeline.TrainIterator.__next__ = original_next
  return loop.train(config, job["workdir"], stage)


def run_sigterm(job: dict, process_id: int) -> dict:
  import jax
  from rlhf_jax.train import loop
  from rlhf_jax.stages import example as toy_stage
  original_next = toy_stage.CountingIterator.__next__

  def next_with_signal(self):
    if self.index == job["signal_at"] and jax.process_index() == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return original_next(self)

  toy_stage.CountingIterator.__next__ = next_with_signal
  try:
    loop.train(make_config("toy", job["overrides"]), job["workdir"], toy_stage)
    raise AssertionError("the run was not pre-empted")
  except loop.Preempted as e:
    return {"preempted_at": e.step, "exit_status": e.code}
  finally:
    toy_stage.CountingIterator.__next__ = original_next


def main(spec_path: str, process_id: int) -> None:
  sys.path.insert(0, ROOT)
  with open(spec_path) as f:
    spec = json.load(f)
  import jax
  jax.config.update("jax_num_cpu_devices", spec["local_devices"])
  if spec.get("cache_dir"):  # the resumed run compiles the same programs again: reuse them
    jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from rlhf_jax.train import distributed
  assert distributed.initialize(spec["coordinator"], spec["num_processes"], process_id)
  assert jax.process_count() == spec["num_processes"]
  assert jax.device_count() == spec["num_processes"] * spec["local_devices"]
  for job in spec["jobs"]:
    if job["kind"] == "train":
      out, name = run_train(job), f"eval_{process_id}.json"
    elif job["kind"] == "sigterm":
      out, name = run_sigterm(job, process_id), f"result_{process_id}.json"
    else:
      raise ValueError(f"{spec_path}: unknown job kind {job['kind']!r}")
    with open(os.path.join(job["workdir"], name), "w") as f:
      json.dump(out, f)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
