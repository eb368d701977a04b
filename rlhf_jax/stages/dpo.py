"""Direct preference optimisation and its family: no reward model, no rollouts.

The policy and the frozen reference each score the stacked chosen and rejected
sequences in one forward pass; `config.preference.loss` names the loss in
`rlhf_jax.objectives.preference.LOSSES` (sigmoid = DPO, robust, ipo,
ipo_length_normalised, hinge, simpo, orpo, kto), whose hyper-parameters are the
`config.preference` fields of the same names. Evaluation calls that same loss on the
held-out pairs and adds, with `config.sampling.eval_prompts`, one sampled response for
each of that many distinct held-out prompts: its sequence KL to the reference and its
gold reward. With `config.preference.reference = 'precompute'` the reference's log-probs
of every pair are computed once before training (`<workdir>/reference_logps.npz`,
reused while the reference params, data and layout are the same) and read from the
batch: no reference forward pass in the step, and no reference params unless
evaluation samples. Online (iterative) DPO, on pairs the policy samples, is
`configs/online_dpo.py` (the RL stage's sampling and rewards).
"""

import functools
import hashlib
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import tokenizers
from rlhf_jax.data import pipeline
from rlhf_jax.model import transformer
from rlhf_jax.objectives import preference
from rlhf_jax.objectives import sft as sft_objective
from rlhf_jax.rl import evaluation as rl_evaluation
from rlhf_jax.stages import common
from rlhf_jax.stages import reward as reward_stage
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import loop
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import step as step_lib

REFERENCE_MODES = ("step", "precompute")
REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")
LOSS_FIELD = "config.preference.loss"


def check_config(config) -> None:
  preference.LOSSES.get(config.preference.loss, LOSS_FIELD)
  if config.preference.reference not in REFERENCE_MODES:
    raise ValueError(f"config.preference.reference: expected one of {REFERENCE_MODES}, got "
                     f"{config.preference.reference!r}")


def make_data(config, workdir):
  check_config(config)
  if config.preference.reference == "step":
    return reward_stage.make_preference_data(config, workdir)
  def splits_with_reference(config, workdir):
    splits, transform, stats, dataset_dir = reward_stage.preference_splits(config, workdir)
    columns = reference_logps(config, workdir, splits, transform, dataset_dir)
    return ({k: pipeline.WithColumns(v, columns[k]) for k, v in splits.items()}, transform,
            stats, dataset_dir)
  return reward_stage.make_preference_data(config, workdir, splits_with_reference)


def params_fingerprint(params) -> str:
  """sha256 of every leaf's path and bytes (one host): equal params, equal strings."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
  return digest.hexdigest()


def _reference_meta(config, splits, dataset_dir, params) -> dict:
  """What the precomputed log-probs depend on; a cache with other values is recomputed.

  The reference is named by its path, its checkpoint step and a fingerprint of its
  params, so a reference run that trained further (or was replaced) is noticed."""
  checkpoint = config.init.checkpoint
  return {"reference": os.path.abspath(checkpoint) if checkpoint
                       else config.init.hf_dir or f"random init, seed {config.seed}",
          "reference_step": checkpoint_lib.checkpoint_dir(checkpoint)[1] if checkpoint else None,
          "reference_params": params_fingerprint(params),
          "dataset_dir": os.path.abspath(dataset_dir), "seq_len": config.data.seq_len,
          "model": config.model.to_dict(), "tokenizer": config.tokenizer.to_dict(),
          "records": {k: len(v) for k, v in splits.items()}}


def reference_logps(config, workdir: str, splits: dict, transform, dataset_dir: str) -> dict:
  """{split: {reference_chosen_logps, reference_rejected_logps: [records] float32}} of the
  frozen reference (the params `init` starts from), NaN for pairs that do not fit;
  cached atomically in `<workdir>/reference_logps.npz`."""
  if jax.process_count() > 1:
    raise ValueError("config.preference.reference='precompute' runs on one host; use 'step'")
  mesh = jax.sharding.get_mesh()   # the training loop's
  if mesh.empty:
    mesh = sharding_lib.make_mesh(config.mesh)
  model = common.make_model(config)
  # The params `init` starts from (same key), without building an optimizer state.
  params, _ = sharding_lib.init_sharded(
      lambda r: transformer.init_params(model, r), loop.run_keys(config.seed)[0],
      mesh, sharding_lib.rules(config))
  params = common.load_initial_params(config, params)
  path = os.path.join(workdir, "reference_logps.npz")
  meta = _reference_meta(config, splits, dataset_dir, params)
  if os.path.exists(path):
    with np.load(path) as saved:
      if json.loads(str(saved["meta"])) == json.loads(json.dumps(meta)):
        return {split: {k: saved[f"{split}/{k}"] for k in REFERENCE_COLUMNS} for split in splits}
    logging.warning("%s: made for another reference (params or step) or dataset; recomputing",
                    path)
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
  sc = config.sampling
  needed = config.data.prompt_len + sc.max_new_tokens
  if sc.eval_prompts and config.model.max_len < needed:
    raise ValueError(f"config.model.max_len={config.model.max_len} < config.data.prompt_len "
                     f"({config.data.prompt_len}) + config.sampling.max_new_tokens "
                     f"({sc.max_new_tokens}), needed to sample at evaluation "
                     "(config.sampling.eval_prompts=0 turns sampling off)")
  keep_reference = config.preference.reference == "step" or sc.eval_prompts > 0
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


def pair_logps(model, params, reference, batch) -> dict:
  """The `preference.preference_loss` inputs of a batch of pairs, each `[batch]`: summed
  policy and reference log-probs of the chosen and rejected responses, response lengths."""
  policy_chosen, policy_rejected, chosen_lengths, rejected_lengths = sequence_logps(
      model, params, batch)
  reference_chosen, reference_rejected = reference_sequence_logps(model, reference, batch)
  return dict(policy_chosen_logps=policy_chosen, policy_rejected_logps=policy_rejected,
              reference_chosen_logps=reference_chosen,
              reference_rejected_logps=reference_rejected, chosen_lengths=chosen_lengths,
              rejected_lengths=rejected_lengths)


def loss_hparams(dc) -> dict:
  """The `config.preference` fields that the section `dc`'s loss takes."""
  return {k: dc[k] for k in preference.LOSSES.get(dc.loss, LOSS_FIELD).hparams}


def loss_of_logps(dc, logps: dict, weights=None):
  """(loss, metrics) of the `config.preference` section `dc`'s loss on `pair_logps`."""
  return preference.preference_loss(dc.loss, **logps, weights=weights, **loss_hparams(dc))


def dpo_loss_and_metrics(dc, model, params, reference, batch, weights=None):
  """The configured loss of the preference family on one batch of pairs; `reference` is
  unused (may be None) when the batch carries precomputed reference log-probs; `weights`
  `[batch]` (an eval batch's `valid`) drop rows. The train step and evaluation both call it."""
  return loss_of_logps(dc, pair_logps(model, params, reference, batch), weights)


def make_step(config):
  model = common.make_model(config)

  def loss_fn(params, extras, batch, rng):
    del rng
    return dpo_loss_and_metrics(config.preference, model, params, extras.get("reference"), batch)

  return step_lib.make_train_step(loss_fn, config)


@functools.cache
def _eval_step(model, dc: ml_collections.FrozenConfigDict):
  @jax.jit
  def eval_step(state, batch):
    logps = pair_logps(model, state.params, state.extras.get("reference"), batch)
    _, metrics = loss_of_logps(dc, logps, batch["valid"])
    reward_chosen, reward_rejected = preference.implicit_rewards(dc.loss, **logps,
                                                                 **loss_hparams(dc))
    return (dict(metrics, weight=jnp.sum(batch["valid"])),
            {"reward_margin": reward_chosen - reward_rejected})
  return eval_step


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


def distinct_prompts(prompts: dict, limit: int) -> dict:
  """The first `limit` distinct valid rows of host prompt rows `[rows, P]`, in order."""
  seen, keep = set(), []
  for i in np.flatnonzero(np.asarray(prompts["valid"]) == 1):
    key = (prompts["prompt_tokens"][i].tobytes(), prompts["prompt_mask"][i].tobytes())
    if key not in seen and len(keep) < limit:
      seen.add(key)
      keep.append(i)
  return {k: np.asarray(prompts[k])[keep] for k in ("prompt_tokens", "prompt_mask")}


def heldout_prompts(config, pair_batches, mesh, pad_id: int) -> dict:
  """The first `config.sampling.eval_prompts` distinct prompts of the held-out pairs
  (pairs share prompts: the testbed labels 4-6 pairs a prompt), the same on every process:
  each batch's prompts are gathered from every process before they are compared."""
  limit = config.sampling.eval_prompts
  gathered, found = [], None
  for batch in pair_batches:
    prompts = pair_prompts(batch, config.data.prompt_len, pad_id)
    gathered.append(sharding_lib.to_host(sharding_lib.put_batch(prompts, mesh)))
    found = distinct_prompts({k: np.concatenate([g[k] for g in gathered]) for k in prompts},
                             limit)
    if len(found["prompt_tokens"]) == limit:
      break
  if found is None:
    raise ValueError("sampled evaluation: the eval split has no pairs")
  return found


def prompt_batches(prompts: dict, batch_size: int, process_index: int, process_count: int):
  """Host batches of `batch_size` global rows of `prompts` `[rows, P]`: this process's
  share of each (rows [p b, (p + 1) b), b = batch_size // process_count), the last batch
  filled with copies of the last prompt (valid 0)."""
  n = len(prompts["prompt_tokens"])
  per_process = batch_size // process_count
  for start in range(0, n, batch_size):
    rows = start + process_index * per_process + np.arange(per_process)
    batch = {k: v[np.minimum(rows, n - 1)] for k, v in prompts.items()}
    yield dict(batch, valid=(rows < n).astype(np.int32))


def sampled_metrics(config, state, data, mesh, rng) -> dict:
  """`rl.evaluation.sampled_policy_metrics` on distinct held-out prompts (one sample each, so
  its standard errors are over prompts), keys prefixed 'sampled/'."""
  model = common.make_model(config)
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  sc = config.sampling
  prompts = heldout_prompts(config, data.eval(), mesh, tokenizer.pad_id)
  batches = prompt_batches(prompts, sc.eval_batch_size, jax.process_index(), jax.process_count())
  summary = rl_evaluation.sampled_policy_metrics(
      model, state.params, model, state.extras["reference"], batches, mesh, rng,
      tokenizer=tokenizer, max_new_tokens=sc.max_new_tokens, num_texts=sc.eval_texts,
      gold_reward=sc.gold_reward)
  return {f"sampled/{k}": v for k, v in summary.items()}


def evaluate(config, state, data, mesh, rng):
  """Held-out pair metrics of the training loss (`loss`, implicit rewards, margin,
  accuracy, log-probs: averaged over the real pairs), gold agreement of the implicit
  reward margin on testbed pairs; with `config.sampling.eval_prompts`, `sampled_metrics`
  too (KL to the reference, gold reward)."""
  eval_step = _eval_step(common.make_model(config),
                         ml_collections.FrozenConfigDict(config.preference))
  metrics, rows = common.evaluate_batches(eval_step, state, data.eval(), mesh,
                                          reward_stage.GOLD_COLUMNS)
  metrics["num_pairs"] = len(rows["reward_margin"])
  metrics.update(reward_stage.gold_metrics(rows["reward_margin"].astype(np.float64), rows))
  if config.sampling.eval_prompts:
    metrics.update(sampled_metrics(config, state, data, mesh, rng))
  return metrics
