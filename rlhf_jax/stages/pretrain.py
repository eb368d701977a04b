"""Pretraining: the SFT stage on plain text (the testbed corpus), every token a target."""

from rlhf_jax.stages import sft
from rlhf_jax.stages.sft import evaluate, init, make_step  # noqa: F401  (the stage interface)


def make_data(config, workdir):
  return sft.make_lm_data(config, workdir, "text")
