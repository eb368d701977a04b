"""The testbed pipeline as functions: stages chained through their workdirs.

pretrain -> sft -> labels (simulated annotators) -> reward -> ppo -> dpo -> evaluation.
Each training stage runs in `root/<stage>` through the shared loop; a stage whose
run finished (final_metrics.json) on the same inputs is skipped, one that was killed
resumes, one whose inputs changed is moved aside and trained again. A SIGTERM stops the
whole pipeline after the running stage saves (loop.Preempted, exit status 143). Used by
experiments/pipeline.py and the reproductions.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np

from configs import pipeline as pipeline_config
from rlhf_jax import stages
from rlhf_jax.stages import reward as reward_stage
from rlhf_jax.testbed import evaluation
from rlhf_jax.testbed import labelling
from rlhf_jax.testbed import policy as policy_lib
from rlhf_jax.train import loop

POLICIES = ("pretrained", "sft", "ppo", "dpo")


def stage_config(config: ml_collections.ConfigDict, name: str, root: str, **init):
  """The stage's config with the pipeline's shared fields (model, seed, corpus, data dir)."""
  c = ml_collections.ConfigDict(config[name].to_dict())
  c.seed = config.seed
  c.model = ml_collections.ConfigDict(config.model.to_dict())
  c.data.update(config.data.to_dict())
  c.data.data_dir = os.path.join(root, "data")
  c.init.update(init)
  return c


INPUTS_FILE = "stage_inputs.json"   # in a stage's workdir: the runs it was trained from


def run_fingerprint(workdir: str) -> dict:
  """What a later stage reads from a run: its latest complete checkpoint step and whether
  (with which final metrics) it finished."""
  ckpt = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
  return {"path": os.path.abspath(workdir), "step": max(steps, default=None),
          "final_metrics": loop.read_final_metrics(workdir)}


def stage_inputs(config: ml_collections.ConfigDict) -> dict:
  """Fingerprints of the runs and datasets a stage config reads (init checkpoint, reward
  model, DPO reference, preference or revision dataset...): every string field that
  names a run's workdir or a prepared dataset (its metadata.json; the directory's name is
  a digest of what it was made from), by dotted key."""
  found = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      elif isinstance(value, str) and value and os.path.isdir(os.path.join(value, "checkpoints")):
        found[prefix + key] = run_fingerprint(value)
      elif isinstance(value, str) and value and os.path.isfile(os.path.join(value, "metadata.json")):
        found[prefix + key] = {"dataset": os.path.abspath(value)}
  walk(config.to_dict(), "")
  return json.loads(json.dumps(found, sort_keys=True))


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def _move_aside(path: str) -> str:
  """Renames a stale stage directory to <path>.stale-<n> (kept, never deleted)."""
  n = 1
  while os.path.exists(f"{path}.stale-{n}"):
    n += 1
  os.replace(path, f"{path}.stale-{n}")
  return f"{path}.stale-{n}"


def _changed(recorded: dict, current: dict) -> str:
  def describe(fingerprint):
    fingerprint = fingerprint or {}
    if "dataset" in fingerprint:
      return os.path.basename(os.path.dirname(fingerprint["dataset"]))
    return f"step {fingerprint.get('step')}"
  keys = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
  return ", ".join(f"{k}: {describe(recorded.get(k))} -> {describe(current.get(k))}"
                   for k in keys)


def train_stage(name: str, config: ml_collections.ConfigDict, root: str) -> str:
  """Runs one training stage unless it finished on the same inputs; returns its workdir.

  A stage trained from runs that have changed since (an upstream stage resumed after a
  pre-emption, or retrained) is moved aside to `<workdir>.stale-<n>` and trained again. A
  SIGTERM stops the pipeline: loop.Preempted (exit status 143) propagates once the stage
  has saved, so no later stage trains on a half-trained one.
  """
  workdir = os.path.join(root, name)
  inputs = stage_inputs(config)
  recorded = _read_json(os.path.join(workdir, INPUTS_FILE))
  if recorded is not None and recorded != inputs:
    stale = _move_aside(workdir)
    print(f"[pipeline] {name}: its inputs changed since it was trained ({_changed(recorded, inputs)}"
          f"); the old run is kept in {stale}, training again")
  elif loop.read_final_metrics(workdir) is not None:
    print(f"[pipeline] {name}: finished earlier, skipped")
    return workdir
  _write_json(os.path.join(workdir, INPUTS_FILE), inputs)
  print(f"[pipeline] {name}: training {config.train.num_steps} steps in {workdir}")
  start = time.perf_counter()
  try:
    loop.train(config, workdir, stages.load(config.stage))
  except loop.Preempted as e:
    print(f"[pipeline] {name}: pre-empted (SIGTERM) at step {e.step}, saved; the pipeline stops "
          f"(exit status {e.code}); rerun the same command to resume")
    raise
  print(f"[pipeline] {name}: done in {time.perf_counter() - start:.0f}s")
  return workdir


def dataset_stage(name: str, root: str, inputs: dict, make) -> str:
  """A dataset made once from the runs in `inputs` (fingerprints); returns its directory.

  `make(out_dir) -> dataset_dir` makes it under `root/<name>`, whose dataset.json records
  the directory and the inputs. Made again (the old one moved aside) when an input run
  has changed since; skipped when it is done.
  """
  out = os.path.join(root, name)
  marker = os.path.join(out, "dataset.json")
  inputs = json.loads(json.dumps(inputs))
  done = _read_json(marker)
  if done is not None and done.get("inputs", inputs) != inputs:
    stale = _move_aside(out)
    print(f"[pipeline] {name}: its inputs changed since it was made ({_changed(done['inputs'], inputs)}"
          f"); the old one is kept in {stale}, making it again")
  elif done is not None:
    print(f"[pipeline] {name}: finished earlier, skipped")
    return done["dataset_dir"]
  dataset_dir = make(out)
  _write_json(marker, {"dataset_dir": dataset_dir, "inputs": inputs})
  return dataset_dir


def label_stage(config: ml_collections.ConfigDict, sft_dir: str, root: str) -> str:
  """Simulated preference pairs from SFT samples; returns the dataset directory."""
  lc = config.labels

  def make(out):
    print(f"[pipeline] labels: {lc.num_prompts} prompts x {lc.k} SFT samples, annotator "
          f"temperature {lc.temperature}")
    return labelling.label(
        sft_dir, out, k=lc.k, temperature=lc.temperature, flip_rate=lc.flip_rate,
        num_prompts=lc.num_prompts, num_test_prompts=lc.num_test_prompts, seed=config.seed,
        max_new_tokens=config.ppo.sampling.max_new_tokens, data_dir=os.path.join(root, "data"),
        verbose=True)
  return dataset_stage("labels", root, {"sft": run_fingerprint(sft_dir)}, make)


def reward_model_scores(reward_dir: str, samples: dict, batch_size: int = 256) -> np.ndarray:
  """Learned-RM scores `[N]` of `policy_lib.generate` samples (prompt + response)."""
  rm_config, model, params = policy_lib.load_policy(reward_dir, heads=reward_stage.HEADS)
  pooling = reward_stage.pooling_of(rm_config)
  tokens = np.concatenate([samples["prompt_tokens"], samples["response_tokens"]], axis=1)
  mask = np.concatenate([samples["prompt_mask"], samples["response_mask"]], axis=1)
  score = jax.jit(lambda p, t, m: reward_stage.score(model, p, t, m, pooling))
  return np.concatenate([np.asarray(score(params, tokens[i:i + batch_size], mask[i:i + batch_size]))
                         for i in range(0, len(tokens), batch_size)])


def best_of_n_picks(proxy: np.ndarray) -> np.ndarray:
  """Flat indices `[P]` into the P*n samples (prompt-major) of each prompt's highest proxy
  score, for `proxy [P, n]`; ties go to the first sample."""
  return proxy.argmax(axis=1) + np.arange(proxy.shape[0]) * proxy.shape[1]


def best_of_n(config, sft_dir: str, reward_dir: str, prompts, rng, sampling: dict) -> dict:
  """Best-of-n against the learned reward model: n SFT samples a prompt, the RM picks one."""
  n = config.evaluation.best_of_n
  sft_config, model, params = policy_lib.load_policy(sft_dir)
  tokenizer = policy_lib.make_tokenizer(sft_config)
  repeated = [p for p in prompts for _ in range(n)]
  out = policy_lib.generate(model, params, repeated, tokenizer, rng, **sampling)
  proxy = reward_model_scores(reward_dir, out).reshape(len(prompts), n)
  best = best_of_n_picks(proxy)
  texts = [out["texts"][i] for i in best]
  gold = policy_lib.gold_scores(prompts, texts)
  summary = evaluation.summarize_policy(texts, gold, out["response_mask"][best].sum(axis=1),
                                        kl=(evaluation.best_of_n_kl(n), 0.0), num_samples=0)
  summary["samples"] = [{"prompt": p, "response": r, "gold": float(g)}
                        for p, r, g in zip(prompts, texts, gold)][:config.evaluation.num_samples]
  summary["proxy_reward"] = float(proxy.reshape(-1)[best].mean())   # of the picked samples
  summary["proxy_reward_all_samples"] = float(proxy.mean())          # of all n per prompt
  summary["kl_note"] = f"analytic: log {n} - ({n}-1)/{n}"
  return summary


def _ranks(x: np.ndarray) -> np.ndarray:
  """Ranks 0..N-1 of `x` (ties broken by position: gold ties are rare after sampling)."""
  ranks = np.empty(len(x))
  ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
  return ranks


def reward_model_report(config, root: str, dirs: dict[str, str]) -> dict:
  """The learned reward model against the gold reward on fresh SFT samples (held-out
  prompts, another seed than the evaluation's): Pearson and Spearman correlation, beside
  the reward stage's held-out pair metrics. Written to `<reward>/gold_correlation.json`."""
  sft_config, model, params = policy_lib.load_policy(dirs["sft"])
  prompts = policy_lib.heldout_prompts(sft_config, os.path.join(root, "data"), "test",
                                       config.evaluation.reward_samples)
  out = policy_lib.generate(model, params, prompts, policy_lib.make_tokenizer(sft_config),
                            jax.random.key(config.seed + 2), **eval_sampling(config, sft_config))
  reward_dir = dirs["reward"]
  proxy = reward_model_scores(reward_dir, out).astype(np.float64)
  gold = policy_lib.gold_scores(prompts, out["texts"]).astype(np.float64)
  report = {"samples": len(prompts),
            "pearson": float(np.corrcoef(proxy, gold)[0, 1]),
            "spearman": float(np.corrcoef(_ranks(proxy), _ranks(gold))[0, 1]),
            "heldout_pairs": loop.read_final_metrics(reward_dir)}
  with open(os.path.join(reward_dir, "gold_correlation.json"), "w") as f:
    json.dump(report, f, indent=1, sort_keys=True)
  return report


def eval_sampling(config, sft_config) -> dict:
  """Sampling for evaluation: the policy itself (temperature 1), PPO's response length."""
  return dict(max_new_tokens=config.ppo.sampling.max_new_tokens, temperature=1.0,
              batch_size=policy_lib.sampling_options(sft_config)["eval_batch_size"],
              prompt_len=config.ppo.data.prompt_len)


def evaluate_all(config, root: str, dirs: dict[str, str]) -> dict:
  """Every policy on the same held-out prompts, KL to the SFT policy."""
  ec = config.evaluation
  sft_config, _, _ = policy_lib.load_policy(dirs["sft"])
  tokenizer = policy_lib.make_tokenizer(sft_config)
  prompts = policy_lib.heldout_prompts(sft_config, os.path.join(root, "data"), "test",
                                       ec.num_prompts)
  sampling = eval_sampling(config, sft_config)
  rng = jax.random.key(config.seed + 1)
  results = {}
  for name in POLICIES:
    results[name] = policy_lib.evaluate_policy(dirs[name], dirs["sft"], prompts, tokenizer, rng,
                                               num_samples=ec.num_samples, **sampling)
  results[f"best_of_{ec.best_of_n}"] = best_of_n(config, dirs["sft"], dirs["reward"], prompts,
                                                 rng, sampling)
  return results


def markdown_table(results: dict) -> str:
  lines = ["| policy | gold reward (mean ± s.e.) | KL to SFT (nats) | length | sample |",
           "|---|---|---|---|---|"]
  for name, r in results.items():
    kl = "—" if r.get("kl") is None else f"{r['kl']:.2f}" + (
        f" ± {r['kl_stderr']:.2f}" if r.get("kl_stderr") else "")
    sample = r["samples"][0] if r.get("samples") else {"prompt": "", "response": ""}
    text = (sample["prompt"] + sample["response"]).replace("|", "/").replace("\n", " ")
    lines.append(f"| {name} | {r['gold_mean']:.3f} ± {r['gold_stderr']:.3f} | {kl} | "
                 f"{r['length_mean']:.1f} | {text} |")
  return "\n".join(lines)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked copy of the pipeline config, shrunk when `quick`."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.quick:
    pipeline_config.make_quick(config)
  return config


def policy_runs(config: ml_collections.ConfigDict, root: str) -> dict[str, str]:
  """pretrain -> sft; returns their workdirs."""
  os.makedirs(root, exist_ok=True)
  dirs = {"pretrained": train_stage("pretrain", stage_config(config, "pretrain", root), root)}
  dirs["sft"] = train_stage("sft", stage_config(config, "sft", root, checkpoint=dirs["pretrained"]),
                            root)
  return dirs


def base_runs(config: ml_collections.ConfigDict, root: str) -> dict[str, str]:
  """pretrain -> sft -> labels -> reward; returns their workdirs and the pairs' dataset."""
  dirs = policy_runs(config, root)
  dirs["labels"] = label_stage(config, dirs["sft"], root)
  rm_config = stage_config(config, "reward", root, checkpoint=dirs["sft"])
  rm_config.data.update(preference_data(dirs))
  dirs["reward"] = train_stage("reward", rm_config, root)
  return dirs


def preference_data(dirs: dict[str, str]) -> dict:
  """config.data fields that read the pipeline's simulated pairs."""
  return {"source": "dataset", "dataset_dir": dirs["labels"]}


def ppo_config(config, root: str, dirs: dict[str, str]) -> ml_collections.ConfigDict:
  c = stage_config(config, "ppo", root, checkpoint=dirs["sft"])
  c.rl.reward_checkpoint = dirs["reward"]
  return c


def dpo_config(config, root: str, dirs: dict[str, str]) -> ml_collections.ConfigDict:
  c = stage_config(config, "dpo", root, checkpoint=dirs["sft"])
  c.data.update(preference_data(dirs))
  return c


def run(config: ml_collections.ConfigDict, root: str, until: str = "evaluation") -> dict:
  """The whole pipeline; returns (and writes) the evaluation table.

  until='reward' stops after the reward model and its report (returned).
  """
  if until not in ("reward", "evaluation"):
    raise ValueError(f"until: expected 'reward' or 'evaluation', got {until!r}")
  config = resolve(config)
  start = time.perf_counter()
  dirs = base_runs(config, root)
  rm = reward_model_report(config, root, dirs)
  pairs = rm["heldout_pairs"]
  print(f"[pipeline] reward model: held-out pair accuracy {pairs['accuracy']:.3f}, gold "
        f"agreement on clear pairs {pairs.get('gold_agreement_clear', float('nan')):.3f}; on "
        f"{rm['samples']} fresh SFT samples Pearson {rm['pearson']:.3f} and Spearman "
        f"{rm['spearman']:.3f} with the gold reward")
  if until == "reward":
    return rm
  dirs["ppo"] = train_stage("ppo", ppo_config(config, root, dirs), root)
  dirs["dpo"] = train_stage("dpo", dpo_config(config, root, dirs), root)
  print("[pipeline] evaluation: every policy on the same held-out prompts")
  results = evaluate_all(config, root, dirs)
  table = markdown_table(results)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  print(f"[pipeline] total {time.perf_counter() - start:.0f}s; results in {root}/results.md")
  return results
