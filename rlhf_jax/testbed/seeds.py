"""The pipeline over several seeds, and its table as mean ± s.d. across them.

Seed 0 runs in the root workdir itself (the layout of a single-seed run, so a finished
`runs/pipeline` is reused); every other seed s in `root/seed_<s>`. Each seed is a whole
pipeline (`config.seed` is every stage's seed; the corpus keeps `config.data.corpus_seed`).
The aggregate goes to `root/results_seeds.json` and `root/results_seeds.md`.
"""

import json
import math
import os
from typing import Callable, Optional, Sequence

import ml_collections
import numpy as np

POLICY_FIELDS = ("gold_mean", "kl", "length_mean")    # results.json fields aggregated per row
REWARD_MODEL_FIELDS = ("accuracy", "gold_agreement_clear", "pearson", "spearman")


def parse_seeds(text: str) -> list[int]:
  """'0,1,2' -> [0, 1, 2]; distinct ints >= 0."""
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--seeds: expected comma-separated ints such as 0,1,2, got {text!r}"
                     ) from None
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds: expected distinct ints >= 0 such as 0,1,2, got {text!r}")
  return seeds


def seed_workdir(root: str, seed: int) -> str:
  """Seed 0 in `root` (the single-seed layout), seed s in `root/seed_<s>`."""
  return root if seed == 0 else os.path.join(root, f"seed_{seed}")


def check_seed(workdir: str, seed: int) -> None:
  """Refuses a workdir whose pretraining ran with another seed: finished stages are skipped
  on rerun, so a mismatch would silently reuse another seed's models."""
  path = os.path.join(workdir, "pretrain", "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    found = json.load(f).get("seed")
  if found is not None and found != seed:
    raise ValueError(f"{path}: seed {found}, but --seeds puts seed {seed} in {workdir}; "
                     "use another --workdir")


def run_seeds(config: ml_collections.ConfigDict, root: str, seeds: Sequence[int],
              run: Callable[[ml_collections.ConfigDict, str], dict]) -> dict:
  """`run(config with seed s, seed_workdir(root, s))` for each seed, then `aggregate`."""
  for seed in seeds:
    workdir = seed_workdir(root, seed)
    check_seed(workdir, seed)
    seeded = ml_collections.ConfigDict(config.to_dict())
    seeded.seed = seed
    print(f"[seeds] seed {seed} in {workdir}")
    run(seeded, workdir)
  return write(root, aggregate(root, seeds))


def _mean_sd(values: list) -> dict:
  """Mean and sample s.d. (ddof 1; None for one seed) of floats; both None if any is None."""
  if any(v is None for v in values):
    return {"mean": None, "sd": None, "values": values}
  x = np.asarray(values, np.float64)
  return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else None,
          "values": [float(v) for v in values]}


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: did that seed's pipeline finish?")
  with open(path) as f:
    return json.load(f)


def aggregate(root: str, seeds: Sequence[int]) -> dict:
  """Each policy row's POLICY_FIELDS (and the reward model's report, where every seed has
  one) as {'mean', 'sd', 'values'} across the seeds' results.json."""
  results = {s: _read_json(os.path.join(seed_workdir(root, s), "results.json")) for s in seeds}
  names = list(results[seeds[0]])
  for s in seeds:
    if sorted(results[s]) != sorted(names):
      raise ValueError(f"{seed_workdir(root, s)}/results.json: policies {sorted(results[s])}, "
                       f"but seed {seeds[0]} has {sorted(names)}")
  out = {"seeds": list(seeds),
         "workdirs": {str(s): seed_workdir(root, s) for s in seeds},
         "policies": {n: {k: _mean_sd([results[s][n].get(k) for s in seeds])
                          for k in POLICY_FIELDS} for n in names}}
  reports = [os.path.join(seed_workdir(root, s), "reward", "gold_correlation.json") for s in seeds]
  if all(os.path.exists(p) for p in reports):
    flat = []
    for p in reports:
      r = _read_json(p)
      flat.append({**{k: r.get(k) for k in ("pearson", "spearman")},
                   **{k: r["heldout_pairs"].get(k) for k in ("accuracy", "gold_agreement_clear")}})
    out["reward_model"] = {k: _mean_sd([f[k] for f in flat]) for k in REWARD_MODEL_FIELDS}
  return out


def _cell(stat: dict, digits: int) -> str:
  if stat["mean"] is None:
    return "—"
  sd = "" if stat["sd"] is None else f" ± {stat['sd']:.{digits}f}"
  return f"{stat['mean']:.{digits}f}{sd}"


def markdown(summary: dict, order: Optional[Sequence[str]] = None) -> str:
  """The table: one row per policy (in `order` first, then the rest sorted), mean ± s.d."""
  policies = summary["policies"]
  names = [n for n in (order or ()) if n in policies]
  names += sorted(n for n in policies if n not in names)
  k = len(summary["seeds"])
  lines = [f"| policy | gold reward (mean ± s.d., {k} seeds) | KL to SFT (nats) | length |",
           "|---|---|---|---|"]
  for n in names:
    p = policies[n]
    lines.append(f"| {n} | {_cell(p['gold_mean'], 3)} | {_cell(p['kl'], 2)} | "
                 f"{_cell(p['length_mean'], 1)} |")
  lines.append("")
  lines.append(f"Seeds {', '.join(map(str, summary['seeds']))}; s.d. across seeds (ddof 1).")
  if "reward_model" in summary:
    rm = summary["reward_model"]
    lines.append("Reward model: " + ", ".join(f"{f} {_cell(rm[f], 3)}" for f in REWARD_MODEL_FIELDS)
                 + ".")
  return "\n".join(lines)


def write(root: str, summary: dict,
          order: Sequence[str] = ("pretrained", "sft", "ppo", "dpo")) -> dict:
  """Writes root/results_seeds.json and .md; returns the summary."""
  with open(os.path.join(root, "results_seeds.json"), "w") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
  table = markdown(summary, order)
  with open(os.path.join(root, "results_seeds.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return summary
