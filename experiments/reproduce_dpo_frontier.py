r"""Reproduces the reward-KL frontier of the DPO paper (Rafailov et al. 2023, fig. 2 left).

  python -m experiments.reproduce_dpo_frontier --workdir=runs/frontier [--quick]

On the sentiment testbed: DPO over several betas, PPO against the learned reward
over several KL coefficients, PPO against the gold reward, and the SFT and
preferred-FT baselines, each over several seeds; every policy's mean gold reward
against its KL to the SFT reference on the same held-out prompts. Writes
frontier.csv, frontier.md and frontier.png to the workdir. The base runs
(pretrain, SFT, labels, reward model) are the pipeline's, shared by all points.
"""

import csv
import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from configs import pipeline as pipeline_config
from experiments import common
from rlhf_jax.testbed import pipeline
from rlhf_jax.testbed import plots
from rlhf_jax.testbed import policy as policy_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(pipeline_config.__file__), "pipeline.py"),
    "The pipeline config whose stages every point uses (e.g. --config.ppo.train.num_steps=80).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory of every run.")
_QUICK = flags.DEFINE_bool("quick", False, "CI-sized: tiny model, one seed, two points a method.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every trained point.")
_BETAS = flags.DEFINE_list("betas", ["0.05", "0.1", "0.3", "1.0"], "DPO betas.")
_KL_COEFS = flags.DEFINE_list("kl_coefs", ["0.01", "0.05", "0.2"], "PPO KL coefficients.")
_BASE = flags.DEFINE_string("base", "", "A pipeline workdir whose base runs (pretrain, sft, labels, "
                            "reward) to reuse (default: WORKDIR/base, made if missing).")
flags.mark_flags_as_required(["workdir"])


def variants(config, root, dirs, seeds, betas, kl_coefs):
  """(method, parameter, seed, stage config) of every trained point."""
  out = []
  for seed in seeds:
    for beta in betas:
      c = pipeline.dpo_config(config, root, dirs)
      c.update(seed=seed)
      c.preference.beta = beta
      out.append(("DPO", f"beta={beta}", seed, c))
    for kl in kl_coefs:
      c = pipeline.ppo_config(config, root, dirs)
      c.update(seed=seed)
      c.rl.kl_coef = kl
      out.append(("PPO (learned RM)", f"kl_coef={kl}", seed, c))
    c = pipeline.ppo_config(config, root, dirs)
    c.update(seed=seed)
    c.rl.reward = "gold"
    out.append(("PPO (gold reward)", f"kl_coef={c.rl.kl_coef}", seed, c))
    c = pipeline.stage_config(config, "sft", root, checkpoint=dirs["sft"])
    c.update(seed=seed)
    c.data.update(pipeline.preference_data(dirs))     # the chosen responses
    c.train.num_steps = config.dpo.train.num_steps
    c.optimizer.learning_rate = config.dpo.optimizer.learning_rate
    out.append(("Preferred-FT", "", seed, c))
  return out


def main(argv):
  del argv
  common.quiet_logging()
  config = pipeline.resolve(_CONFIG.value)
  if _QUICK.value:
    pipeline_config.make_quick(config)
  seeds = [int(s) for s in _SEEDS.value]
  betas, kl_coefs = [float(b) for b in _BETAS.value], [float(k) for k in _KL_COEFS.value]
  if _QUICK.value:
    seeds, betas, kl_coefs = seeds[:1], betas[1:2], kl_coefs[1:2]
  root = _WORKDIR.value
  base = _BASE.value or os.path.join(root, "base")
  dirs = pipeline.base_runs(config, base)

  sft_config, _, _ = policy_lib.load_policy(dirs["sft"])
  tokenizer = policy_lib.make_tokenizer(sft_config)
  prompts = policy_lib.heldout_prompts(sft_config, os.path.join(base, "data"), "test",
                                       config.evaluation.num_prompts)
  sampling = pipeline.eval_sampling(config, sft_config)
  rng = jax.random.key(1)
  evaluate = lambda path: policy_lib.evaluate_policy(path, dirs["sft"], prompts, tokenizer, rng,
                                                     num_samples=0, **sampling)
  rows = [dict(method="SFT", parameter="", seed=0, **_point(evaluate(dirs["sft"])))]
  for method, parameter, seed, stage in variants(config, root, dirs, seeds, betas, kl_coefs):
    name = f"{method}-{parameter}-seed{seed}".replace(" ", "_").replace("(", "").replace(")", "")
    workdir = pipeline.train_stage(name, stage, root)
    rows.append(dict(method=method, parameter=parameter, seed=seed, **_point(evaluate(workdir))))
    print(f"[frontier] {name}: gold {rows[-1]['gold']:.3f}, KL {rows[-1]['kl']:.2f}")

  with open(os.path.join(root, "frontier.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  table = ["| method | parameter | seed | gold reward | KL to SFT |", "|---|---|---|---|---|"]
  table += [f"| {r['method']} | {r['parameter']} | {r['seed']} | {r['gold']:.3f} ± "
            f"{r['gold_stderr']:.3f} | {r['kl']:.2f} ± {r['kl_stderr']:.2f} |" for r in rows]
  with open(os.path.join(root, "frontier.md"), "w") as f:
    f.write("\n".join(table) + "\n")
  plots.frontier(rows, os.path.join(root, "frontier.png"))
  print("\n".join(table))
  print(f"[frontier] wrote {root}/frontier.png, frontier.csv, frontier.md")


def _point(result: dict) -> dict:
  return {"gold": result["gold_mean"], "gold_stderr": result["gold_stderr"],
          "kl": result["kl"] or 0.0, "kl_stderr": result.get("kl_stderr") or 0.0,
          "length": result["length_mean"]}


if __name__ == "__main__":
  app.run(main)
