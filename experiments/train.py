r"""The one entry point for every stage: the stage is a config field.

  python -m experiments.train --config=configs/sft.py --workdir=/tmp/sft \
      --config.train.num_steps=500 --config.optimizer.learning_rate=3e-4

Multi-host: the same command on every host, plus --coordinator_address=host0:port
--num_processes=N --process_id=i (or nothing, where JAX detects the cluster:
Slurm, Open MPI, Cloud TPU, Kubernetes). See rlhf_jax/train/distributed.py.
"""

import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from experiments import common
from rlhf_jax import stages
from rlhf_jax.train import distributed
from rlhf_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<stage>.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job; 0: auto-detect.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process, in [0, num_processes); -1: auto.")
_LOCAL_DEVICES = flags.DEFINE_string("local_device_ids", "", "Comma-separated devices this process uses.")


def main(argv):
  del argv
  common.quiet_logging()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                         _LOCAL_DEVICES.value)
  config = _CONFIG.value
  stage = stages.load(config.stage)
  metrics = loop.train(config, _WORKDIR.value, stage)
  if jax.process_index() == 0:
    print(json.dumps({"final_eval": metrics}, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
