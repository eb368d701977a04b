"""The pipeline's stages; each module has make_data / init / make_step / evaluate."""

import importlib

NAMES = ("pretrain", "sft", "reward", "dpo", "ppo")


def load(name: str):
  """The stage module `rlhf_jax.stages.<name>`; a clear error for an unknown name."""
  if name not in NAMES:
    raise ValueError(f"config.stage: unknown stage {name!r}; expected one of {NAMES}")
  return importlib.import_module(f"rlhf_jax.stages.{name}")
