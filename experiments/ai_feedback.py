r"""RLAIF and Constitutional AI on the red-team testbed, each beside its RLHF twin:

  python -m experiments.ai_feedback --workdir=runs/ai_feedback [--config.quick=True]

pretrain (reviews on harsh requests + the constitution's judgements in the corpus) ->
sft -> {simulated human labels, AI labels} -> reward models -> PPO and DPO; SL-CAI
(the SFT model revises its own samples, SFT on the revisions) -> RL-CAI (AI labels under
every principle -> reward model -> PPO, DPO). Then a judge report (agreement with gold
per principle, position bias), every policy's gold helpfulness, harm rate and KL on
held-out red-team prompts, and the helpfulness-harmlessness frontier (frontier.png).
Stages are skipped, resumed or retrained as in experiments.pipeline
(rlhf_jax/testbed/ai_feedback.py).
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import ai_feedback as ai_feedback_config
from experiments import common
from rlhf_jax.testbed import ai_feedback

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(ai_feedback_config.__file__), "ai_feedback.py"),
    "The AI-feedback pipeline config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; one subdirectory per stage.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  common.quiet_logging()
  ai_feedback.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
