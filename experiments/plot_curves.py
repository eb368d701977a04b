r"""Gold reward and KL against the iteration for RL runs, from their metrics.jsonl.

  python -m experiments.plot_curves --out=curves.png \
      --run="PPO, learned RM=runs/ppo_rm" --run="PPO, gold reward=runs/ppo_gold"

Reads the eval rows (`split: eval`) of each run's metrics.jsonl; the PPO stage logs
gold_mean, kl and their standard errors every `config.train.eval_every` iterations.
"""

import json
import os

from absl import app
from absl import flags

from rlhf_jax.testbed import plots

_RUNS = flags.DEFINE_multi_string("run", None, "LABEL=WORKDIR of an RL run (repeatable).")
_OUT = flags.DEFINE_string("out", None, "PNG file to write.")
flags.mark_flags_as_required(["run", "out"])


def eval_rows(workdir: str) -> list[dict]:
  """The eval rows of `workdir/metrics.jsonl` that carry a gold reward."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--run: {path} does not exist (expected an RL run's workdir)")
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if r.get("split") == "eval" and "gold_mean" in r]
  if not rows:
    raise ValueError(f"--run: {path} has no eval row with gold_mean (set "
                     "config.train.eval_every, and evaluate a testbed RL run)")
  return rows


def plot(specs: list[str], out: str) -> None:
  """specs: 'LABEL=WORKDIR' strings (the label may itself contain '=')."""
  runs = {}
  for spec in specs:
    label, sep, workdir = spec.rpartition("=")
    if not sep or not label:
      raise ValueError(f"--run={spec!r}: expected LABEL=WORKDIR")
    runs[label] = eval_rows(workdir)
  plots.training_curves(runs, out)


def main(argv):
  del argv
  plot(_RUNS.value, _OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
