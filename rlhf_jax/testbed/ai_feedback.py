"""RLAIF and Constitutional AI on the red-team testbed, each beside its RLHF twin.

  pretrain -> sft                               (the helpful model: reviews on request)
  pretrain -> feedback_model                    (judge, critic, reviser: fine-tuned on the
                                                 corpus's judgements and critique-revisions)
  labels_human -> reward_human -> ppo_human, dpo_human      RLHF, helpful only
  labels_ai    -> reward_ai    -> ppo_ai,    dpo_ai         RLAIF (judge: principle 'helpful')
  ppo_direct                                                d-RLAIF: the judge's verdict as reward
  revisions -> sft_cai                                      SL-CAI (critique, revise: 'harmless')
  labels_cai   -> reward_cai   -> ppo_cai,   dpo_cai        RL-CAI (judge: every principle)
  judge report, evaluation, frontier

The feedback model is the pretrained run fine-tuned on the comparisons, verdicts and
critique-revisions of its corpus (`harsh_reviews_feedback`: answers and rewrites from the
grammar's latent variables, never from gold). It judges pairs, and it critiques and
revises the SFT policy's samples (Bai et al. have the policy critique itself; a model
this small learns the critique format only from a fine-tune, so the feedback model does
it, as a separate critic model would). The
human labels are the simulated annotators on the gold helpfulness (`harshness`); no
stage of the AI arms reads a gold score. Stages are skipped, resumed and retrained as in
`pipeline` (its `train_stage` and `dataset_stage`). Writes results.json, results.md and
frontier.png (helpfulness against harmlessness) under the root.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np

from configs import ai_feedback as ai_feedback_config
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import judge as judge_lib
from rlhf_jax.feedback import models as feedback_models
from rlhf_jax.feedback import revision
from rlhf_jax.testbed import annotators
from rlhf_jax.testbed import harsh_reviews
from rlhf_jax.testbed import labelling
from rlhf_jax.testbed import pipeline
from rlhf_jax.testbed import plots
from rlhf_jax.testbed import policy as policy_lib
from rlhf_jax.train import checkpoint as checkpoint_lib

CLEAR_GAP = 0.5      # a pair is clear when its gold differs by more than this (harm: 0 or 1)


def helpfulness(prompts, responses) -> np.ndarray:
  """Gold helpfulness `[N]` of responses to harsh requests (`harsh_reviews.harshness`)."""
  del prompts
  return harsh_reviews.harshness(responses)


def harm(prompts, responses) -> np.ndarray:
  """Gold harm `[N]`: 1 where the response insults someone."""
  del prompts
  return harsh_reviews.harm(responses)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  if config.quick:
    ai_feedback_config.make_quick(config)
  return config


def _data_dir(root: str) -> str:
  return os.path.join(root, "data")


def _label_options(config) -> dict:
  lc = config.labels
  return dict(k=lc.k, num_prompts=lc.num_prompts, num_test_prompts=lc.num_test_prompts,
              seed=config.seed, max_new_tokens=config.ppo.sampling.max_new_tokens)


def human_labels(config, policy_dir: str, root: str) -> str:
  """Simulated annotators on the gold helpfulness of the policy's samples."""
  def make(out):
    return labelling.label(policy_dir, out, temperature=config.labels.temperature,
                           flip_rate=config.labels.flip_rate, data_dir=_data_dir(root),
                           score_fn=helpfulness, verbose=True, **_label_options(config))
  return pipeline.dataset_stage("labels_human", root,
                                {"policy": pipeline.run_fingerprint(policy_dir)}, make)


def ai_labels(config, name: str, policy_dir: str, judge_dir: str, principles: str,
              root: str, prompt_run: str = "") -> str:
  """The judge's labels of the policy's samples under `principles` (no gold read; the
  gold is only recorded beside the labels for the reports). Prompts: those of
  `prompt_run`'s source when given (SL-CAI was trained on a prepared dataset)."""
  fc = config.feedback

  def make(out):
    return labelling.label_ai(policy_dir, out, judge_dir, config.data.constitution,
                              principles=principles, judge_batch_size=fc.judge_batch_size,
                              data_dir=_data_dir(root), score_fn=helpfulness, verbose=True,
                              prompt_run=prompt_run, **_label_options(config))
  inputs = {"policy": pipeline.run_fingerprint(policy_dir),
            "judge": pipeline.run_fingerprint(judge_dir), "principles": principles}
  return pipeline.dataset_stage(name, root, inputs, make)


def revisions(config, sft_dir: str, critic_dir: str, root: str) -> str:
  """SL-CAI: the critic critiques and revises the SFT policy's samples of train prompts."""
  fc = config.feedback

  def make(out):
    policy, critic = feedback_models.load(sft_dir), feedback_models.load(critic_dir)
    con = constitution_lib.load(config.data.constitution)
    fmt = constitution_lib.make_format(con, "plain")
    sft_config = policy_lib.read_config(sft_dir)
    sets = {"train": policy_lib.heldout_prompts(sft_config, _data_dir(root), "train",
                                                fc.revision_prompts),
            "test": policy_lib.heldout_prompts(sft_config, _data_dir(root), "test", 64)}
    batch = config.ppo.sampling.eval_batch_size
    responses = {split: feedback_models.sample_texts(
        policy, [fmt.render(con.turn("response", prompt=p)) for p in prompts],
        jax.random.fold_in(jax.random.key(config.seed), 100 + i), add_bos=fmt.add_bos,
        max_new_tokens=config.ppo.sampling.max_new_tokens, batch_size=batch)
        for i, (split, prompts) in enumerate(sets.items())}
    dataset_dir, stats = revision.make_dataset(
        critic, con, fmt, sets, out, seed=config.seed, responses=responses,
        settings={"responses_from": policy.source}, rounds=fc.revision_rounds,
        principles=fc.revision_principles, critique_tokens=fc.critique_tokens,
        revision_tokens=fc.revision_tokens, batch_size=batch, stop=("\n",))
    print(f"[pipeline] revisions: {stats['train_kept']} kept, "
          f"{stats['train_changed_rate']:.1%} changed by the revision")
    return dataset_dir
  inputs = {"sft": pipeline.run_fingerprint(sft_dir),
            "critic": pipeline.run_fingerprint(critic_dir)}
  return pipeline.dataset_stage("revisions", root, inputs, make)


def arm_runs(config, root: str, arm: str, policy_dir: str, labels_dir: str) -> dict:
  """reward -> PPO against it, and DPO on the same pairs, from `policy_dir`."""
  data = {"source": "dataset", "dataset_dir": labels_dir}
  rm = pipeline.stage_config(config, "reward", root, checkpoint=policy_dir)
  rm.data.update(data)
  reward_dir = pipeline.train_stage(f"reward_{arm}", rm, root)
  ppo = pipeline.stage_config(config, "ppo", root, checkpoint=policy_dir)
  ppo.rl.reward_checkpoint = reward_dir
  dpo = pipeline.stage_config(config, "dpo", root, checkpoint=policy_dir)
  dpo.data.update(data)
  return {f"reward_{arm}": reward_dir,
          f"ppo_{arm}": pipeline.train_stage(f"ppo_{arm}", ppo, root),
          f"dpo_{arm}": pipeline.train_stage(f"dpo_{arm}", dpo, root)}


# ------------------------------------------------------------------------ reports

def judge_report(config, root: str, dirs: dict) -> dict:
  """Agreement with gold, per principle, of the judge and of the simulated annotators, on
  pairs of fresh SFT samples to held-out prompts; with the judge's position bias."""
  fc, lc = config.feedback, config.labels
  con = constitution_lib.load(config.data.constitution)
  judge = feedback_models.load(dirs["judge"])
  fmt = constitution_lib.make_format(con, "plain")
  samples, _ = labelling.sample_responses(
      dirs["sft"], k=lc.k, num_prompts=1, num_test_prompts=lc.num_test_prompts,
      seed=config.seed + 7, split="train", max_new_tokens=config.ppo.sampling.max_new_tokens,
      sample_temperature=None, top_k=None, top_p=None, batch_size=None,
      data_dir=_data_dir(root), score_fn=helpfulness)
  prompts, responses, _ = samples["test"]
  flat = [r for rs in responses for r in rs]
  gold = {"helpful": harsh_reviews.harshness(flat).reshape(len(prompts), lc.k),
          "harmless": -harsh_reviews.harm(flat).reshape(len(prompts), lc.k)}
  report = {"pairs_from": f"{len(prompts)} held-out prompts x {lc.k} SFT samples, all pairs"}
  for name, scores in gold.items():
    _, rows, stats = judge_lib.label_responses(
        judge, con, fmt, prompts, responses, scores=scores, principles=name, seed=config.seed,
        batch_size=fc.judge_batch_size)
    gap = np.array([_gold_gap(r, name) for r in rows])
    agree = np.array([np.sign(r["margin"]) == np.sign(g) for r, g in zip(rows, gap)])
    clear = np.abs(gap) > CLEAR_GAP
    human, _ = annotators.label_pairs(prompts, responses, scores, rng_seed=config.seed,
                                                temperature=lc.temperature)
    human_gap = np.array([r["chosen_score"] - r["rejected_score"] for r in human])
    decided = human_gap != 0
    report[name] = {
        "judge_agreement": stats["agreement_rate"] if stats["gold_decided"] else None,
        "decided_pairs": stats["gold_decided"],
        "judge_agreement_clear": float(agree[clear].mean()) if clear.any() else None,
        "clear_pairs": int(clear.sum()),
        "human_agreement": float((human_gap[decided] > 0).mean()) if decided.any() else None,
        "human_agreement_clear": float((human_gap[np.abs(human_gap) > CLEAR_GAP] > 0).mean())
                                 if (np.abs(human_gap) > CLEAR_GAP).any() else None,
        **{k: stats[k] for k in ("position_bias_before", "first_wins_rate",
                                 "order_consistency", "position_bias_after")}}
  return report


def _gold_gap(row: dict, principle: str) -> float:
  """Gold of a minus gold of b under a principle (harm is negated: fewer insults win)."""
  texts = [row["response_a"], row["response_b"]]
  if principle == "helpful":
    a, b = harsh_reviews.harshness(texts)
  else:
    a, b = -harsh_reviews.harm(texts)
  return float(a) - float(b)


def _evaluate(policy, reference, prompts, tokenizer, rng, sampling, num_samples=2) -> dict:
  return policy_lib.evaluate_policy(policy, reference, prompts, tokenizer, rng,
                                    num_samples=num_samples, gold_fn=helpfulness,
                                    extra_scores={"harm": harm}, **sampling)


def _checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def _load_step(workdir: str, step: int):
  _, model, params = policy_lib.load_policy(workdir)
  return model, checkpoint_lib.load_params(os.path.join(workdir, "checkpoints", str(step)),
                                           params)


REFERENCES = {"sft": None, "sft_cai": "sft", "ppo_human": "sft", "dpo_human": "sft",
              "ppo_ai": "sft", "dpo_ai": "sft", "ppo_direct": "sft", "ppo_cai": "sft_cai",
              "dpo_cai": "sft_cai"}
PPO_RUNS = ("ppo_human", "ppo_ai", "ppo_direct", "ppo_cai")


def evaluate_all(config, root: str, dirs: dict) -> dict:
  """Every policy on the same held-out red-team prompts: helpfulness (gold harshness),
  harm rate, KL to the policy it was trained from; and each PPO run's checkpoints."""
  ec = config.evaluation
  sft_config, _, _ = policy_lib.load_policy(dirs["sft"])
  tokenizer = policy_lib.make_tokenizer(sft_config)
  prompts = policy_lib.heldout_prompts(sft_config, _data_dir(root), "test", ec.num_prompts)
  sampling = pipeline.eval_sampling(config, sft_config)
  rng = jax.random.key(config.seed + 1)
  results = {}
  for name, ref in REFERENCES.items():
    if name not in dirs:
      continue
    results[name] = _evaluate(dirs[name], dirs[ref] if ref else None, prompts, tokenizer, rng,
                              sampling)
    results[name]["reference"] = ref
  curves = {}
  for name in (n for n in PPO_RUNS if n in dirs):
    ref = REFERENCES[name]
    reference = policy_lib.as_policy(dirs[ref])
    curves[name] = []
    for step in _checkpoint_steps(dirs[name]):
      r = _evaluate(_load_step(dirs[name], step), reference, prompts[:ec.frontier_prompts],
                    tokenizer, rng, sampling, num_samples=0)
      curves[name].append({"step": step, **{k: r[k] for k in (
          "gold_mean", "gold_stderr", "harm_mean", "harm_stderr", "kl", "kl_stderr")}})
  results["ppo_curves"] = curves
  return results


def matched_kl(curves: dict, a: str, b: str) -> dict:
  """Gold helpfulness of PPO runs `a` and `b` at the same KL: the smaller of their final
  KLs, each curve linearly interpolated (KL of the SFT model itself: 0, gold: its own)."""
  finals = [curves[n][-1]["kl"] for n in (a, b)]
  target = float(min(finals))
  out = {"kl": target}
  for name in (a, b):
    kl = np.array([c["kl"] for c in curves[name]], np.float64)
    gold = np.array([c["gold_mean"] for c in curves[name]], np.float64)
    order = np.argsort(kl)
    out[name] = float(np.interp(target, kl[order], gold[order]))
  return out


def _pm(mean, stderr) -> str:
  return "—" if mean is None else f"{mean:.3f} ± {stderr:.3f}" if stderr is not None else f"{mean:.3f}"


def markdown(results: dict, report: dict) -> str:
  lines = ["| policy | labels | helpfulness (gold harshness) | harm rate | KL to reference "
           "(nats) | reference | sample |", "|---|---|---|---|---|---|---|"]
  labels = {"sft": "demonstrations", "sft_cai": "own revisions (harmless)",
            "ppo_human": "simulated human (helpful)", "dpo_human": "simulated human (helpful)",
            "ppo_ai": "AI judge (helpful)", "dpo_ai": "AI judge (helpful)",
            "ppo_direct": "none: judge verdict as reward (helpful)",
            "ppo_cai": "AI judge (harmless + helpful)",
            "dpo_cai": "AI judge (harmless + helpful)"}
  for name in (n for n in REFERENCES if n in results):
    r = results[name]
    sample = r["samples"][0]["response"].replace("|", "/") if r["samples"] else ""
    lines.append(f"| {name} | {labels[name]} | {_pm(r['gold_mean'], r['gold_stderr'])} | "
                 f"{_pm(r['harm_mean'], r['harm_stderr'])} | {_pm(r.get('kl'), r.get('kl_stderr'))} "
                 f"| {r['reference'] or '—'} | {sample} |")
  lines += ["", "| principle | judge agreement with gold: all (pairs) / clear (pairs) | "
            "simulated annotators T=0.5: all / clear | position bias before / after the swap |",
            "|---|---|---|---|"]
  for name in ("helpful", "harmless"):
    j = report[name]
    lines.append(f"| {name} | {_pm(j['judge_agreement'], None)} ({j['decided_pairs']}) / "
                 f"{_pm(j['judge_agreement_clear'], None)} ({j['clear_pairs']}) | "
                 f"{_pm(j['human_agreement'], None)} / {_pm(j['human_agreement_clear'], None)} | "
                 f"{j['position_bias_before']:+.3f} / {j['position_bias_after']:.1e} |")
  return "\n".join(lines)


def frontier_points(results: dict) -> dict:
  """{label: [(helpfulness, harmlessness = 1 - harm rate), ...]} for the plot."""
  points = {}
  for name, label in (("ppo_human", "RLHF, helpful only (PPO)"),
                      ("ppo_ai", "RLAIF, helpful (PPO)"), ("ppo_direct", "d-RLAIF (PPO)"),
                      ("ppo_cai", "RL-CAI (PPO)")):
    if name not in results["ppo_curves"]:
      continue
    start = results[REFERENCES[name]]
    curve = [(start["gold_mean"], 1 - start["harm_mean"])]
    curve += [(c["gold_mean"], 1 - c["harm_mean"]) for c in results["ppo_curves"][name]]
    points[label] = curve
  for name, label in (("sft", "SFT"), ("sft_cai", "SL-CAI"), ("dpo_human", "DPO, human labels"),
                      ("dpo_ai", "DPO, AI labels"), ("dpo_cai", "DPO, CAI labels")):
    points[label] = [(results[name]["gold_mean"], 1 - results[name]["harm_mean"])]
  return points


def run(config: ml_collections.ConfigDict, root: str) -> dict:
  """The whole AI-feedback pipeline; returns (and writes) results and the judge report."""
  config = resolve(config)
  start = time.perf_counter()
  dirs = pipeline.policy_runs(config, root)
  dirs["judge"] = pipeline.train_stage(
      "feedback_model", pipeline.stage_config(config, "feedback_model", root,
                                              checkpoint=dirs["pretrained"]), root)
  dirs["labels_human"] = human_labels(config, dirs["sft"], root)
  dirs["labels_ai"] = ai_labels(config, "labels_ai", dirs["sft"], dirs["judge"],
                                config.feedback.rlaif_principles, root)
  dirs["revisions"] = revisions(config, dirs["sft"], dirs["judge"], root)
  cai = pipeline.stage_config(config, "sft_cai", root, checkpoint=dirs["pretrained"])
  cai.data.update({"source": "dataset", "dataset_dir": dirs["revisions"]})
  dirs["sft_cai"] = pipeline.train_stage("sft_cai", cai, root)
  dirs["labels_cai"] = ai_labels(config, "labels_cai", dirs["sft_cai"], dirs["judge"],
                                 config.feedback.cai_principles, root, prompt_run=dirs["sft"])
  dirs.update(arm_runs(config, root, "human", dirs["sft"], dirs["labels_human"]))
  dirs.update(arm_runs(config, root, "ai", dirs["sft"], dirs["labels_ai"]))
  dirs.update(arm_runs(config, root, "cai", dirs["sft_cai"], dirs["labels_cai"]))
  if jax.device_count() <= 2:   # d-RLAIF's judge callback (train/validate.py)
    direct = pipeline.stage_config(config, "ppo", root, checkpoint=dirs["sft"])
    direct.rl.update(reward="judge", judge=dirs["judge"],
                     judge_constitution=config.data.constitution,
                     judge_principles=config.feedback.rlaif_principles,
                     judge_batch_size=config.feedback.judge_batch_size)
    dirs["ppo_direct"] = pipeline.train_stage("ppo_direct", direct, root)
  else:
    print(f"[pipeline] ppo_direct: skipped ({jax.device_count()} devices; d-RLAIF runs on <= 2)")
  print("[pipeline] judge report: agreement with gold per principle on held-out pairs")
  report = judge_report(config, root, dirs)
  print("[pipeline] evaluation: every policy on the same held-out red-team prompts")
  results = evaluate_all(config, root, dirs)
  results["rlaif_vs_rlhf_at_equal_kl"] = matched_kl(results["ppo_curves"], "ppo_human", "ppo_ai")
  results["judge"] = report
  results["seconds"] = time.perf_counter() - start
  table = markdown(results, report)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  with open(os.path.join(root, "results.md"), "w") as f:
    f.write(table + "\n")
  plots.helpfulness_harmlessness(frontier_points(results), os.path.join(root, "frontier.png"))
  print(table)
  m = results["rlaif_vs_rlhf_at_equal_kl"]
  print(f"[pipeline] at KL {m['kl']:.2f}: PPO on human labels {m['ppo_human']:.3f}, on AI "
        f"labels {m['ppo_ai']:.3f} (gold helpfulness)")
  print(f"[pipeline] total {results['seconds']:.0f}s; results in {root}/results.md, "
        f"{root}/frontier.png")
  return results
