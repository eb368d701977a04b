"""Direct preference optimisation and its family: no reward model, no rollouts.

The policy and the frozen reference each score the stacked chosen and rejected
sequences in one forward pass; `config.dpo.loss` picks the loss of
`rlhf_jax.objectives.preference` (sigmoid = DPO, robust, ipo, hinge, simpo, orpo)
or 'kto' on the pairs taken apart (chosen desirable, rejected undesirable).
Evaluation adds, beside the held-out pair metrics, one sampled response for each of
`config.dpo.eval_prompts` held-out prompts: its sequence KL to the reference and its
gold reward. Online (iterative) DPO, on pairs the policy samples, is
`configs/online_dpo.py` (the RL stage's sampling and rewards).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import tokenizers
from rlhf_jax.objectives import preference
from rlhf_jax.objectives import sft as sft_objective
from rlhf_jax.stages import common
from rlhf_jax.stages import reward as reward_stage
from rlhf_jax.stages import rollout as rollout_lib
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import step as step_lib

LOSSES = preference.KINDS + ("kto",)
# config.dpo fields each loss takes, as keyword hyper-parameters.
HPARAMS = {"sigmoid": ("beta", "label_smoothing"), "robust": ("beta", "label_smoothing"),
           "ipo": ("beta",), "hinge": ("beta",), "simpo": ("beta", "gamma"), "orpo": ("lam",),
           "kto": ("beta", "desirable_weight", "undesirable_weight")}


def make_data(config, workdir):
  return reward_stage.make_preference_data(config, workdir)


def init(config, rng, mesh):
  if config.dpo.loss not in LOSSES:
    raise ValueError(f"config.dpo.loss: unknown loss {config.dpo.loss!r}; expected one of {LOSSES}")
  needed = config.data.prompt_len + config.dpo.max_new_tokens
  if config.dpo.eval_prompts and config.model.max_len < needed:
    raise ValueError(f"config.model.max_len={config.model.max_len} < config.data.prompt_len "
                     f"({config.data.prompt_len}) + config.dpo.max_new_tokens "
                     f"({config.dpo.max_new_tokens}), needed to sample at evaluation "
                     "(config.dpo.eval_prompts=0 turns sampling off)")
  return common.init_state(config, common.make_model(config), rng, mesh,
                           extras_fn=lambda params: {"reference": params})


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


def dpo_loss_and_metrics(dc, model, params, reference, batch):
  """The configured loss of the preference family on one batch of pairs."""
  pc, pr, lc, lr = sequence_logps(model, params, batch)
  rc, rr, _, _ = jax.lax.stop_gradient(sequence_logps(model, reference, batch))
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
    return dpo_loss_and_metrics(config.dpo, model, params, extras["reference"], batch)

  tx = state_lib.make_optimizer(config.optimizer, config.train.num_steps)
  schedule = state_lib.learning_rate_schedule(config.optimizer, config.train.num_steps)
  return step_lib.make_train_step(loss_fn, tx, schedule, config.optimizer.grad_accum_steps)


@functools.cache
def _logps_fn(model):
  @jax.jit
  def fn(params, reference, batch):
    return sequence_logps(model, params, batch)[:2], sequence_logps(model, reference, batch)[:2]
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
  """Prompt batches of the held-out pairs, up to `config.dpo.eval_prompts` real rows."""
  left = config.dpo.eval_prompts
  for batch in batches:
    if left <= 0:
      return
    prompts = pair_prompts(batch, config.data.prompt_len, pad_id)
    keep = np.cumsum(prompts["valid"] == 1) <= left
    prompts["valid"] = np.where(keep, prompts["valid"], 0).astype(np.int32)
    left -= int(prompts["valid"].sum())
    yield prompts


def sampled_metrics(config, state, data, mesh, rng) -> dict:
  """`rollout.sampled_policy_metrics` on the held-out pairs' prompts, keys prefixed 'sampled/'."""
  model = common.make_model(config)
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  summary = rollout_lib.sampled_policy_metrics(
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
        (fn(state.params, state.extras["reference"], batch), columns))
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
