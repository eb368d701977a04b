r"""The one entry point for every stage: the stage is a config field.

  python -m experiments.train --config=configs/sft.py --workdir=/tmp/sft \
      --config.train.num_steps=500 --config.optimizer.learning_rate=3e-4
"""

import importlib
import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from rlhf_jax.train import loop

STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<stage>.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def load_stage(name: str):
  if name not in STAGES:
    raise ValueError(f"config.stage: unknown stage {name!r}; expected one of {STAGES}")
  return importlib.import_module(f"rlhf_jax.stages.{name}")


def write_config(config, workdir: str) -> None:
  """Writes the resolved config to workdir/config.json (atomically)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + ".tmp", path)


def quiet_logging() -> None:
  """absl WARNING unless --verbosity was given: Orbax logs every file it writes at INFO."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def main(argv):
  del argv
  quiet_logging()
  config = _CONFIG.value
  stage = load_stage(config.stage)
  write_config(config, _WORKDIR.value)
  metrics = loop.train(config, _WORKDIR.value, stage)
  print(json.dumps({"final_eval": metrics}, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
