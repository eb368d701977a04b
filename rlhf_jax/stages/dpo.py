"""Direct preference optimisation and its family: no reward model, no rollouts.

The policy and the frozen reference each score the stacked chosen and rejected
sequences in one forward pass; `config.dpo.loss` picks the loss of
`rlhf_jax.objectives.preference` (sigmoid = DPO, robust, ipo, hinge, simpo, orpo)
or 'kto' on the pairs taken apart (chosen desirable, rejected undesirable).
Evaluation adds, beside the held-out pair metrics, one sampled response for each of
`config.dpo.eval_prompts` held-out prompts: its sequence KL to the reference and its
gold reward. With `config.dpo.reference = 'precompute'` the reference's log-probs of
every pair are computed once before training (`<workdir>/reference_logps.npz`, reused
while the reference, data and layout are the same) and read from the batch: no
reference forward pass in the step, and no reference params unless evaluation samples.
Online (iterative) DPO, on pairs the policy samples, is
`configs/online_dpo.py` (the RL stage's sampling and rewards).
"""

import functools
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import tokenizers
from rlhf_jax.data import pipeline
from rlhf_jax.objectives import preference
from rlhf_jax.objectives import sft as sft_objective
from rlhf_jax.stages import common
from rlhf_jax.stages import reward as reward_stage
from rlhf_jax.rl import evaluation as rl_evaluation
from rlhf_jax.train import loop
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import step as step_lib

LOSSES = preference.KINDS + ("kto",)
REFERENCE_MODES = ("step", "precompute")
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")
# config.dpo fields each loss takes, as keyword hyper-parameters.
HPARAMS = {"sigmoid": ("beta", "label_smoothing"), "robust": ("beta", "label_smoothing"),
           "ipo": ("beta",), "hinge": ("beta",), "simpo": ("beta", "gamma"), "orpo": ("lam",),
           "kto": ("beta", "desirable_weight", "undesirable_weight")}


def check_config(config) -> None:
  if config.dpo.loss not in LOSSES:
    raise ValueError(f"config.dpo.loss: unknown loss {config.dpo.loss!r}; expected one of {LOSSES}")
  if config.dpo.reference not in REFERENCE_MODES:
    raise ValueError(f"config.dpo.reference: expected one of {REFERENCE_MODES}, got "
                     f"{config.dpo.reference!r}")


def make_data(config, workdir):
  check_config(config)
  if config.dpo.reference == "step":
    return reward_stage.make_preference_data(config, workdir)
  def splits_with_reference(config, workdir):
    splits, transform, stats, dataset_dir = reward_stage.preference_splits(config, workdir)
    columns = reference_logps(config, workdir, splits, transform, dataset_dir)
    return ({k: pipeline.WithColumns(v, columns[k]) for k, v in splits.items()}, transform,
            stats, dataset_dir)
  return reward_stage.make_preference_data(config, workdir, splits_with_reference)


def _reference_meta(config, splits, dataset_dir) -> dict:
  """What the precomputed log-probs depend on; a cache with other values is recomputed."""
  return {"reference": os.path.abspath(config.init.checkpoint) if config.init.checkpoint
                       else config.init.hf_dir or f"random init, seed {config.seed}",
          "dataset_dir": os.path.abspath(dataset_dir), "seq_len": config.data.seq_len,
          "model": config.model.to_dict(), "tokenizer": config.tokenizer.to_dict(),
          "records": {k: len(v) for k, v in splits.items()}}


def reference_logps(config, workdir: str, splits: dict, transform, dataset_dir: str) -> dict:
  """{split: {reference_chosen_logps, reference_rejected_logps: [records] float32}} of the
  frozen reference (the params `init` starts from), NaN for pairs that do not fit;
  cached atomically in `<workdir>/reference_logps.npz`."""
  if jax.process_count() > 1:
    raise ValueError("config.dpo.reference='precompute' runs on one host; use 'step'")
  path = os.path.join(workdir, "reference_logps.npz")
  meta = _reference_meta(config, splits, dataset_dir)
  if os.path.exists(path):
    with np.load(path) as saved:
      if json.loads(str(saved["meta"])) == json.loads(json.dumps(meta)):
        return {split: {k: saved[f"{split}/{k}"] for k in REFERENCE_COLUMNS} for split in splits}
    logging.warning("%s: made for another reference or dataset; recomputing", path)
  mesh = jax.sharding.get_mesh()   # the training loop's
  if mesh.empty:
    mesh = sharding_lib.make_mesh(config.mesh)
  model = common.make_model(config)
  # The params `init` starts from (same key), without building an optimizer state.
  params, _ = sharding_lib.init_sharded(
      lambda r: model.init(r, *common.dummy_inputs())["params"], loop.run_keys(config.seed)[0],
      mesh, sharding_lib.rules(config))
  params = common.load_initial_params(config, params)
  fn = jax.jit(lambda p, b: sequence_logps(model, p, b)[:2])
  size = config.data.eval_batch_size
  out = {}
  for split, records in splits.items():
    columns = {k: np.full(len(records), np.nan, np.float32) for k in REFERENCE_COLUMNS}
    examples = [(i, e) for i in range(len(records)) if (e := transform(records[i])) is not None]
    for start in range(0, len(examples), size):
      chunk = examples[start:start + size]
      rows = [e for _, e in chunk] + [chunk[-1][1]] * (size - len(chunk))   # fixed shape
      batch = pipeline.stack([{k: v for k, v in e.items() if k not in REFERENCE_COLUMNS}
                              for e in rows])
      chosen, rejected = sharding_lib.to_host(fn(params, sharding_lib.put_batch(batch, mesh)))
      index = [i for i, _ in chunk]
      columns["reference_chosen_logps"][index] = chosen[:len(chunk)]
      columns["reference_rejected_logps"][index] = rejected[:len(chunk)]
    out[split] = columns
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, meta=json.dumps(meta), **{f"{s}/{k}": v for s, c in out.items()
                                          for k, v in c.items()})
  os.replace(path + ".tmp", path)
  return out


def init(config, rng, mesh):
  check_config(config)
  needed = config.data.prompt_len + config.dpo.max_new_tokens
  if config.dpo.eval_prompts and config.model.max_len < needed:
    raise ValueError(f"config.model.max_len={config.model.max_len} < config.data.prompt_len "
                     f"({config.data.prompt_len}) + config.dpo.max_new_tokens "
                     f"({config.dpo.max_new_tokens}), needed to sample at evaluation "
                     "(config.dpo.eval_prompts=0 turns sampling off)")
  keep_reference = config.dpo.reference == "step" or config.dpo.eval_prompts > 0
  return common.init_state(config, common.make_model(config), rng, mesh,
                           extras_fn=lambda params: {"reference": params} if keep_reference else {})


def sequence_logps(model, params, batch):
  """Summed response log-probs and response lengths, chosen and rejected: 4 x [batch]."""
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
  outputs, _ = model.apply({"params": params}, tokens, common.positions_from_mask(mask), mask)
  logps = sft_objective.sequence_logprobs(outputs["logits"], tokens, loss_mask)
  lengths = jnp.sum(loss_mask[:, 1:], axis=-1).astype(jnp.float32)
  n = batch["chosen_tokens"].shape[0]
  return logps[:n], logps[n:], lengths[:n], lengths[n:]


def reference_sequence_logps(model, reference, batch):
  """(chosen, rejected) `[batch]` log-probs of the reference: precomputed, or a forward pass."""
  if REFERENCE_COLUMNS[0] in batch:
    return tuple(batch[k] for k in REFERENCE_COLUMNS)
  return jax.lax.stop_gradient(sequence_logps(model, reference, batch)[:2])


def dpo_loss_and_metrics(dc, model, params, reference, batch):
  """The configured loss of the preference family on one batch of pairs; `reference` is
  unused (may be None) when the batch carries precomputed reference log-probs."""
  pc, pr, lc, lr = sequence_logps(model, params, batch)
  rc, rr = reference_sequence_logps(model, reference, batch)
  hparams = {k: dc[k] for k in HPARAMS[dc.loss]}
  if dc.loss == "kto":
    policy = jnp.concatenate([pc, pr])
    ref = jnp.concatenate([rc, rr])
    desirable = jnp.arange(policy.shape[0]) < pc.shape[0]
    # z0 (KTO sec. 4.1) from the batch's own log-ratios: the pairs are not re-matched
    # with other prompts, a cheaper (and more conservative) estimate than the paper's.
    z0 = preference.kto_reference_point(policy, ref)
    loss = jnp.mean(preference.kto_loss(policy, ref, desirable, z0, **hparams))
    reward_c, reward_r = dc.beta * (pc - rc), dc.beta * (pr - rr)
    metrics = {"loss": loss, "kto/z0": z0, "rewards/chosen": jnp.mean(reward_c),
               "rewards/rejected": jnp.mean(reward_r), "rewards/margin": jnp.mean(reward_c - reward_r),
               "rewards/accuracy": jnp.mean((reward_c > reward_r).astype(jnp.float32)),
               "logps/chosen": jnp.mean(pc), "logps/rejected": jnp.mean(pr)}
    return loss, metrics
  return preference.preference_loss(dc.loss, pc, pr, rc, rr, chosen_lengths=lc,
                                    rejected_lengths=lr, **hparams)


def make_step(config):
  model = common.make_model(config)

  def loss_fn(params, extras, batch, rng):
    del rng
    return dpo_loss_and_metrics(config.dpo, model, params, extras.get("reference"), batch)

  return step_lib.make_train_step(loss_fn, config)


@functools.cache
def _logps_fn(model):
  @jax.jit
  def fn(params, reference, batch):
    return sequence_logps(model, params, batch)[:2], reference_sequence_logps(model, reference,
                                                                               batch)
  return fn


def pair_prompts(batch: dict, prompt_len: int, pad_id: int) -> dict:
  """The prompts of a host batch of pairs, left-padded to `[batch, prompt_len]`.

  The prompt is the chosen sequence's real tokens before the response (BOS first); a
  longer one keeps BOS and its last `prompt_len - 1` tokens, as `collate.prompt_example`.
  """
  tokens, mask, loss_mask = (np.asarray(batch[f"chosen_{k}"]) for k in ("tokens", "mask",
                                                                        "loss_mask"))
  out = np.full((len(tokens), prompt_len), pad_id, np.int32)
  out_mask = np.zeros((len(tokens), prompt_len), np.int32)
  for i, row in enumerate(tokens):
    ids = row[(mask[i] != 0) & (loss_mask[i] == 0)]
    if len(ids) > prompt_len:
      ids = np.concatenate([ids[:1], ids[len(ids) - prompt_len + 1:]])
    out[i, prompt_len - len(ids):] = ids
    out_mask[i, prompt_len - len(ids):] = 1
  return {"prompt_tokens": out, "prompt_mask": out_mask, "valid": np.asarray(batch["valid"])}


def _prompt_batches(config, batches, pad_id: int):
  """Prompt batches of the first `config.dpo.eval_prompts` held-out pairs.

  Rows are cut by their index in the global batch, so every process yields the same
  number of batches (each one is a collective step) whatever its share of real rows.
  """
  size = config.data.eval_batch_size
  per_process = size // jax.process_count()
  for b, batch in enumerate(batches):
    if b * size >= config.dpo.eval_prompts:
      return
    prompts = pair_prompts(batch, config.data.prompt_len, pad_id)
    rows = b * size + jax.process_index() * per_process + np.arange(per_process)
    prompts["valid"] = np.where(rows < config.dpo.eval_prompts, prompts["valid"], 0
                                ).astype(np.int32)
    yield prompts


def sampled_metrics(config, state, data, mesh, rng) -> dict:
  """`rollout.sampled_policy_metrics` on the held-out pairs' prompts, keys prefixed 'sampled/'."""
  model = common.make_model(config)
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  summary = rl_evaluation.sampled_policy_metrics(
      model, state.params, model, state.extras["reference"],
      _prompt_batches(config, data.eval(), tokenizer.pad_id), mesh, rng, tokenizer=tokenizer,
      max_new_tokens=config.dpo.max_new_tokens, num_texts=config.dpo.eval_texts)
  return {f"sampled/{k}": v for k, v in summary.items()}


def evaluate(config, state, data, mesh, rng):
  """Held-out preference metrics: implicit rewards beta * log(pi / pi_ref), margin, accuracy;
  with `config.dpo.eval_prompts`, `sampled_metrics` too (KL to the reference, gold reward)."""
  fn = _logps_fn(common.make_model(config))
  rows = {"pc": [], "pr": [], "rc": [], "rr": [], "valid": [], "gold": []}
  for batch in data.eval():
    batch = sharding_lib.put_batch(batch, mesh)   # multi-host: gather outputs and columns alike
    columns = {k: batch[k] for k in ("valid", "chosen_score", "rejected_score") if k in batch}
    ((pc, pr), (rc, rr)), batch = sharding_lib.to_host(
        (fn(state.params, state.extras.get("reference"), batch), columns))
    for k, v in zip(("pc", "pr", "rc", "rr", "valid"), (pc, pr, rc, rr, batch["valid"])):
      rows[k].append(v)
    if "chosen_score" in batch:
      rows["gold"].append(batch["chosen_score"] - batch["rejected_score"])
  valid = np.concatenate(rows["valid"]) == 1
  take = lambda k: np.concatenate(rows[k])[valid].astype(np.float64)
  pc, pr, rc, rr = take("pc"), take("pr"), take("rc"), take("rr")
  beta = config.dpo.beta
  reward_c, reward_r = beta * (pc - rc), beta * (pr - rr)
  metrics = {"rewards/chosen": float(reward_c.mean()), "rewards/rejected": float(reward_r.mean()),
             "rewards/margin": float((reward_c - reward_r).mean()),
             "rewards/accuracy": float(np.mean(reward_c > reward_r)),
             "logps/chosen": float(pc.mean()), "logps/rejected": float(pr.mean()),
             "dpo_loss": float(np.mean(np.logaddexp(0.0, -(reward_c - reward_r)))),
             "num_pairs": int(valid.sum())}
  if rows["gold"]:
    metrics["gold_agreement"] = float(np.mean((reward_c - reward_r) * take("gold") > 0))
  if config.dpo.eval_prompts:
    metrics.update(sampled_metrics(config, state, data, mesh, rng))
  return metrics
