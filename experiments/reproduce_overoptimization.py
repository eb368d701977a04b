r"""Reproduces reward-model over-optimisation (Gao et al. 2022, fig. 1) on the testbed.

  python -m experiments.reproduce_overoptimization --workdir=runs/overopt [--quick]

A gold-labelled preference set (annotator temperature 0: the gold ordering) from SFT
samples; proxy reward models trained on its first N pairs for several N; then
  * best-of-n against each proxy, n = 1 .. 256, from one pool of SFT samples a prompt
    (the unbiased estimator of Gao et al. app. I over the pool), KL = log n - (n-1)/n;
  * PPO against each proxy, every checkpoint evaluated (Monte-Carlo KL to SFT);
gold and proxy reward against d = sqrt(KL). Fits the paper's forms to the gold
reward gain: best-of-n R(d) = d (alpha - beta d), RL R(d) = d (alpha - beta log d).
Writes overoptimization.csv, .md (with the fitted coefficients) and .png.
"""

import csv
import math
import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from configs import pipeline as pipeline_config
from experiments import common
from rlhf_jax.data import tfds_builders
from rlhf_jax.testbed import evaluation
from rlhf_jax.testbed import overoptimization as overopt
from rlhf_jax.testbed import pipeline
from rlhf_jax.testbed import plots
from rlhf_jax.testbed import policy as policy_lib
from rlhf_jax.train import checkpoint as checkpoint_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(pipeline_config.__file__), "pipeline.py"),
    "The pipeline config whose stages every point uses (e.g. --config.ppo.train.num_steps=80).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory of every run.")
_QUICK = flags.DEFINE_bool("quick", False, "CI-sized: tiny model, small pools, two proxies.")
_RM_PAIRS = flags.DEFINE_list("rm_pairs", ["250", "1000", "4000"], "Train pairs of each proxy RM.")
_POOL = flags.DEFINE_integer("pool", 256, "SFT samples a prompt for best-of-n (largest n).")
_BON_PROMPTS = flags.DEFINE_integer("bon_prompts", 64, "Held-out prompts for best-of-n.")
_BASE = flags.DEFINE_string("base", "", "A pipeline workdir whose pretrain and sft runs to reuse "
                            "(default: WORKDIR/base, made if missing).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  common.quiet_logging()
  config = pipeline.resolve(_CONFIG.value)
  if _QUICK.value:
    pipeline_config.make_quick(config)
  config.labels.temperature = 0.0          # the gold-labelled set
  rm_pairs = [int(n) for n in _RM_PAIRS.value]
  pool, bon_prompts = _POOL.value, _BON_PROMPTS.value
  if _QUICK.value:
    rm_pairs, pool, bon_prompts = [16, 64], 16, 8
  config.labels.num_prompts = max(config.labels.num_prompts, max(rm_pairs) // 3 + 1)
  root = _WORKDIR.value
  base = _BASE.value or os.path.join(root, "base")
  dirs = pipeline.policy_runs(config, base)
  dirs["labels"] = pipeline.label_stage(config, dirs["sft"], root)   # gold labels, in root

  sft_config, sft_model, sft_params = policy_lib.load_policy(dirs["sft"])
  tokenizer = policy_lib.make_tokenizer(sft_config)
  sampling = pipeline.eval_sampling(config, sft_config)
  rng = jax.random.key(2)

  available = tfds_builders.read_metadata(dirs["labels"])["stats"]["train_labelled"]
  if max(rm_pairs) > available:
    print(f"[overopt] only {available} gold-labelled train pairs: proxy sizes {rm_pairs} "
          f"clipped to {available}")
  rm_pairs = sorted({min(n, available) for n in rm_pairs})
  proxies = {}
  for n_pairs in rm_pairs:
    c = pipeline.stage_config(config, "reward", root, checkpoint=dirs["sft"])
    c.data.update(pipeline.preference_data(dirs))
    c.data.max_train_records = n_pairs
    proxies[str(n_pairs)] = pipeline.train_stage(f"proxy_rm_{n_pairs}", c, root)

  rows = []
  # Best-of-n: one pool of SFT samples a prompt, scored by gold and every proxy.
  prompts = policy_lib.heldout_prompts(sft_config, os.path.join(base, "data"), "test", bon_prompts)
  repeated = [p for p in prompts for _ in range(pool)]
  samples = policy_lib.generate(sft_model, sft_params, repeated, tokenizer, rng, **sampling)
  gold = policy_lib.gold_scores(repeated, samples["texts"]).reshape(bon_prompts, pool)
  ns = [2 ** i for i in range(int(math.log2(pool)) + 1)]
  for rm, rm_dir in proxies.items():
    proxy = pipeline.reward_model_scores(rm_dir, samples).reshape(bon_prompts, pool)
    for n in ns:
      per_prompt = overopt.best_of_n_expectation(proxy, gold, n)
      rows.append({"method": "best-of-n", "rm": rm, "n_or_step": n,
                   "kl": evaluation.best_of_n_kl(n), "gold": float(per_prompt.mean()),
                   "gold_stderr": _stderr(per_prompt),
                   "proxy": float(overopt.best_of_n_expectation(proxy, proxy, n).mean())})

  # RL: PPO against each proxy; every kept checkpoint evaluated.
  eval_prompts = policy_lib.heldout_prompts(sft_config, os.path.join(base, "data"), "test",
                                            config.evaluation.num_prompts)
  for rm, rm_dir in proxies.items():
    c = pipeline.ppo_config(config, root, dict(dirs, reward=rm_dir))
    c.train.checkpoint_every = max(1, c.train.num_steps // 8)
    c.train.keep_checkpoints = 100
    workdir = pipeline.train_stage(f"ppo_proxy_{rm}", c, root)
    ckpt_root = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpt_root) if s.isdigit())
    for step in [0] + steps:
      params = sft_params if step == 0 else checkpoint_lib.load_params(
          os.path.join(ckpt_root, str(step)), sft_params)
      out = policy_lib.generate(sft_model, params, eval_prompts, tokenizer, rng, **sampling)
      ref = policy_lib.sequence_logprobs_under(sft_model, sft_params, out["prompt_tokens"],
                                               out["prompt_mask"], out["response_tokens"],
                                               out["response_mask"], batch_size=sampling["batch_size"])
      kl, _ = evaluation.sequence_kl_estimate(out["logprobs"], ref, out["response_mask"])
      gold = policy_lib.gold_scores(eval_prompts, out["texts"])
      rows.append({"method": "PPO", "rm": rm, "n_or_step": step, "kl": max(kl, 0.0),
                   "gold": float(gold.mean()), "gold_stderr": _stderr(gold),
                   "proxy": float(pipeline.reward_model_scores(rm_dir, out).mean())})
      print(f"[overopt] PPO vs RM {rm} step {step}: KL {kl:.2f} gold {rows[-1]['gold']:.3f} "
            f"proxy {rows[-1]['proxy']:.3f}")

  for r in rows:
    r["d"] = math.sqrt(r["kl"])
  fits, fit_lines = {}, []
  for method, form in (("best-of-n", "bon"), ("PPO", "rl")):
    for rm in proxies:
      pts = sorted((r for r in rows if r["method"] == method and r["rm"] == rm), key=lambda r: r["d"])
      d = np.array([r["d"] for r in pts])
      gain = np.array([r["gold"] for r in pts]) - pts[0]["gold"]
      alpha, beta = overopt.fit(form, d, gain)
      fits[(method, rm)] = overopt.fitted(form, alpha, beta)
      # Peak and fall in optimisation order (n, or PPO step): KL need not grow every step.
      ordered = sorted(pts, key=lambda r: r["n_or_step"])
      peak, end = max(ordered, key=lambda r: r["gold"]), ordered[-1]
      fall = end["gold"] - peak["gold"]
      two_se = 2 * math.hypot(peak["gold_stderr"], end["gold_stderr"])
      fit_lines.append(
          f"| {method} | {rm} | {alpha:.4f} | {beta:.4f} | {peak['kl']:.2f} | {peak['gold']:.3f} | "
          f"{fall:+.3f} ± {two_se:.3f} | {'yes' if -fall > two_se else 'no'} | "
          f"{ordered[0]['proxy']:.2f} -> {end['proxy']:.2f} |")

  with open(os.path.join(root, "overoptimization.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, ["method", "rm", "n_or_step", "kl", "d", "gold", "gold_stderr",
                                "proxy"])
    writer.writeheader()
    writer.writerows(rows)
  table = ["| method | proxy RM pairs | alpha | beta | KL at gold peak | gold at peak | "
           "gold at the end - peak (± 2 s.e.) | gold falls | proxy, start -> end |",
           "|---|---|---|---|---|---|---|---|---|"] + fit_lines
  with open(os.path.join(root, "overoptimization.md"), "w") as f:
    f.write("\n".join(table) + "\n")
  plots.overoptimization({m: [r for r in rows if r["method"] == m] for m in ("best-of-n", "PPO")},
                         fits, os.path.join(root, "overoptimization.png"))
  print("\n".join(table))
  print(f"[overopt] wrote {root}/overoptimization.png, .csv, .md")


def _stderr(x) -> float:
  x = np.asarray(x, np.float64)
  return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


if __name__ == "__main__":
  app.run(main)
