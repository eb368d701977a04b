r"""The whole pipeline on the sentiment testbed, one command:

  python -m experiments.pipeline --workdir=runs/pipeline [--config.quick=True] [--until=reward]
  python -m experiments.pipeline --workdir=runs/pipeline --seeds=0,1,2   # mean ± s.d.

pretrain -> sft -> labels (simulated annotators) -> reward -> ppo -> dpo -> evaluation,
each stage in its own subdirectory, chained through checkpoints. Re-running skips
stages that finished; a stage that was killed resumes from its last checkpoint; a
stage whose input runs changed since it trained is moved aside and trained again.
SIGTERM: the running stage saves and the pipeline exits with status 143 (rerun to resume).
At the end it prints, and writes as JSON and Markdown, a table: for each policy
(pretrained, SFT, PPO, DPO, best-of-n against the reward model) the mean gold
reward, KL to the SFT reference, response length and a sample.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import pipeline as pipeline_config
from experiments import common
from rlhf_jax.testbed import pipeline
from rlhf_jax.testbed import seeds

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(pipeline_config.__file__), "pipeline.py"),
    "The pipeline config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; one subdirectory per stage.")
_UNTIL = flags.DEFINE_enum("until", "evaluation", ["reward", "evaluation"],
                           "'reward' stops after the reward model and its report.")
_SEEDS = flags.DEFINE_string("seeds", "", "Comma-separated seeds, e.g. 0,1,2: one pipeline per "
                             "seed (seed 0 in --workdir, seed s in <workdir>/seed_<s>), then "
                             "results_seeds.md/json with mean ± s.d. (rlhf_jax/testbed/seeds.py).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  common.quiet_logging()
  if _SEEDS.value:
    if _UNTIL.value != "evaluation":
      raise app.UsageError("--seeds aggregates the evaluation table: drop --until")
    seeds.run_seeds(_CONFIG.value, _WORKDIR.value, seeds.parse_seeds(_SEEDS.value), pipeline.run)
    return
  pipeline.run(_CONFIG.value, _WORKDIR.value, until=_UNTIL.value)


if __name__ == "__main__":
  app.run(main)
