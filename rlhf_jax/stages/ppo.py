"""RLHF with PPO (Ouyang et al. 2022, InstructGPT; Huang et al. 2024, "The N+
implementation details of RLHF with PPO"), its critic-free cousins RLOO (Ahmadian
et al. 2024) and GRPO (Shao et al. 2024), and online DPO (Guo et al. 2024, "Direct
language model alignment from online AI feedback"), as `config.ppo.algorithm`.

Online DPO is the DPO stage's loss on pairs the current policy samples: each iteration
is one round of iterative DPO (rounds = `config.train.num_steps`): `samples_per_prompt`
responses to each of `config.data.batch_size` prompts, the reward function (learned
model or gold) picks the best and the worst (ties drop out of the loss), and
`epochs` x `num_minibatches` DPO updates train on those pairs against the frozen
reference, with beta = `kl_coef`.

One step is one iteration, a single pure function:
  1. rollout (stages/rollout.py): sample `samples_per_prompt` responses per prompt with
     the KV-cache sampler; full forward passes give the policy's and the reference's
     per-token log-probs (logits / temperature, so the first ratio is exactly 1), the
     critic's values, and the reward function's sequence score;
  2. advantages: PPO shapes per-token rewards (-beta KL_t, plus the score at the last
     token) and runs GAE; RLOO uses the KL-penalised sequence reward minus the
     leave-one-out mean; GRPO the group-normalised score (its KL is in the loss);
     online DPO forms pairs instead (`preference_pairs`);
  3. `epochs` passes over the rollout in `num_minibatches` shuffled minibatches inside
     `lax.scan`, one optimizer update each (clipped surrogate, clipped value loss,
     entropy bonus; global-norm clipping is in the optimizer);
  4. the adaptive KL controller (Ziegler et al. 2019, eq. 2) updates `extras['kl_coef']`.

State: `params = {'policy', ['critic']}` (one optimizer); frozen `extras = {'reference',
['reward'], 'kl_coef'}`. `state.step` counts optimizer updates (epochs x minibatches per
iteration), and so does the learning-rate schedule.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax import tokenizers
from rlhf_jax.data import collate
from rlhf_jax.data import pipeline
from rlhf_jax.data import sources
from rlhf_jax.data import tfds_builders
from rlhf_jax.objectives import policy_gradient as pg
from rlhf_jax.objectives import preference
from rlhf_jax.stages import common
from rlhf_jax.stages import rollout as rollout_lib
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import loop
from rlhf_jax.train import optimizer as optimizer_lib
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import step as step_lib


def num_updates(config: ml_collections.ConfigDict) -> int:
  """Optimizer updates over the run: iterations x epochs x minibatches."""
  return config.train.num_steps * config.ppo.epochs * config.ppo.num_minibatches


# ------------------------------------------------------------------------ data

def make_data(config: ml_collections.ConfigDict, workdir: str) -> loop.Data:
  """Left-padded prompt batches {prompt_tokens, prompt_mask} `[batch, prompt_len]`."""
  dataset_dir, stats = sources.prompts(config.data, common.data_dir(config, workdir))
  splits = tfds_builders.load(dataset_dir, kind="prompt")
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  transform = collate.make_transform("prompt", tokenizer, prompt_len=config.data.prompt_len)
  train = pipeline.make_train_iterator(splits["train"], transform, config.data.batch_size,
                                       config.seed, jax.process_index(), jax.process_count())
  eval_batches = functools.cache(lambda: pipeline.make_eval_batches(
      splits["test"], transform, config.data.eval_batch_size, config.train.eval_batches or None,
      shard_index=jax.process_index(), shard_count=jax.process_count())[0])
  return loop.Data(train=train, eval=eval_batches,
                   stats=dict(stats, train_prompts=len(splits["train"])))


# ------------------------------------------------------------------------ init

def _lm_only(params):
  return {k: v for k, v in params.items() if k != "scalar_head"}


def init(config: ml_collections.ConfigDict, rng: jax.Array, mesh) -> state_lib.TrainState:
  """Policy from `config.init`, frozen reference = a copy of it, reward model and critic
  from `config.ppo.reward_checkpoint`. Without a reward checkpoint the separate critic is
  the policy's trunk; a value head that does not come from the reward model starts at 0."""
  models = rollout_lib.make_models(config)
  pc = config.ppo
  tx = optimizer_lib.make_optimizer(config.optimizer, num_updates(config)).tx

  def init_fn(r):
    r_policy, r_critic, r_reward = jax.random.split(r, 3)
    params = {"policy": models.policy.init(r_policy, *common.dummy_inputs())["params"]}
    if models.critic is not None:
      params["critic"] = models.critic.init(r_critic, *common.dummy_inputs())["params"]
    extras = {"kl_coef": jnp.asarray(pc.kl_coef, jnp.float32)}
    if models.reward is not None:
      extras["reward"] = models.reward.init(r_reward, *common.dummy_inputs())["params"]
    return state_lib.TrainState.create(params=params, tx=tx, extras=extras)

  state, _ = sharding_lib.init_sharded(init_fn, rng, mesh, sharding_lib.rules(config))
  params, extras = dict(state.params), dict(state.extras)
  params["policy"] = common.load_initial_params(config, params["policy"])
  if models.reward is not None:
    extras["reward"] = checkpoint_lib.load_params(pc.reward_checkpoint, extras["reward"])
  # A value head not from the reward model starts at V = 0: advantages then begin as
  # (whitened) returns, not returns minus a random function of the prefix.
  if models.critic is not None:
    params["critic"] = (checkpoint_lib.load_params(pc.reward_checkpoint, params["critic"])
                        if pc.reward_checkpoint
                        else common.zero_scalar_head(
                            common.load_initial_params(config, params["critic"])))
  elif "scalar_head" in params["policy"]:   # shared critic: a new value head on the policy
    params["policy"] = common.zero_scalar_head(params["policy"])
  # The reference owns its buffers: the policy's are donated to every step.
  reference = _lm_only(params["policy"])
  copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                 out_shardings=sharding_lib.shardings_of(reference))
  extras["reference"] = copy(reference)
  return state.replace(params=params, extras=extras)


# ------------------------------------------------------------------------ step

def _sequence_sum(x, mask):
  return jnp.sum(jnp.where(mask != 0, x, 0.0), axis=1)


def explained_variance(values, returns, mask):
  """1 - Var[returns - values] / Var[returns] over response tokens."""
  var = lambda x: pg.masked_mean(jnp.square(x - pg.masked_mean(x, mask)), mask)
  return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def penalised_scores(config: ml_collections.ConfigDict, ro: dict) -> jax.Array:
  """`[batch]` scores less `missing_eos_penalty` for responses that never emit EOS
  (Huang et al. 2024, detail "EOS trick")."""
  return ro["scores"] - jnp.where(ro["contains_eos"], 0.0, config.ppo.missing_eos_penalty)


def advantages(config: ml_collections.ConfigDict, ro: dict, kl_coef) -> tuple[dict, dict]:
  """Adds the algorithm's advantages (and PPO's returns) to the rollout; returns metrics.

  Scores pass through `penalised_scores` first.
  """
  pc = config.ppo
  mask = ro["response_mask"]
  scores = penalised_scores(config, ro)
  penalty = pg.kl_penalty(ro["logprobs"], ro["ref_logprobs"], pc.kl_estimator)
  sequence_penalty = _sequence_sum(penalty, mask)
  rlhf_reward = scores - kl_coef * sequence_penalty
  ro = dict(ro)
  metrics = {"rlhf_reward": jnp.mean(rlhf_reward)}
  if pc.algorithm == "ppo":
    rewards = pg.shaped_rewards(scores, ro["logprobs"], ro["ref_logprobs"], mask, kl_coef,
                                pc.kl_estimator)
    if pc.whiten_rewards:   # scale only: the KL penalty keeps its sign
      rewards = pg.whiten(rewards, mask, shift_mean=False)
    adv, ro["returns"] = pg.gae(rewards, ro["values"], mask, pc.gamma, pc.lam)
    metrics.update(explained_variance=explained_variance(ro["values"], ro["returns"], mask),
                   value_mean=pg.masked_mean(ro["values"], mask),
                   return_mean=pg.masked_mean(ro["returns"], mask))
  elif pc.algorithm == "rloo":   # REINFORCE leave-one-out on the KL-penalised sequence reward
    adv = pg.rloo_advantages(rlhf_reward, pc.samples_per_prompt)[:, None] * jnp.ones_like(
        ro["logprobs"])
  else:                          # GRPO: the score alone; KL is a loss term
    ro["sequence_advantages"] = pg.grpo_advantages(scores, pc.samples_per_prompt)
    adv = ro["sequence_advantages"][:, None] * jnp.ones_like(ro["logprobs"])
  if pc.algorithm != "grpo" and pc.whiten_advantages:
    adv = pg.whiten(adv, mask)
  ro["advantages"] = jnp.where(mask != 0, adv, 0.0)
  return ro, metrics


def preference_pairs(ro: dict, samples_per_prompt: int) -> tuple[dict, dict]:
  """Online DPO's training pairs: the best and worst scored of each prompt's k samples.

  Args:
    ro: a rollout of `[prompts * k]` rows, the k samples of a prompt contiguous.
  Returns:
    `[prompts]` pairs: chosen_/rejected_ tokens, mask `[prompts, P + n]` and
    response_mask `[prompts, n]`; reference_chosen_logps, reference_rejected_logps
    (summed over the response); `valid` 0 where the k scores tie (no preference).
    And metrics: the fraction of tied prompts and the mean best-minus-worst score.
  """
  scores = ro["scores"].reshape(-1, samples_per_prompt)
  base = jnp.arange(scores.shape[0]) * samples_per_prompt
  rows = {"chosen": base + jnp.argmax(scores, axis=1), "rejected": base + jnp.argmin(scores, axis=1)}
  gap = jnp.max(scores, axis=1) - jnp.min(scores, axis=1)
  pairs = {"valid": (gap > 0).astype(jnp.float32)}
  for name, index in rows.items():
    for key in ("tokens", "mask", "response_mask"):
      pairs[f"{name}_{key}"] = ro[key][index]
    pairs[f"reference_{name}_logps"] = _sequence_sum(ro["ref_logprobs"][index],
                                                     ro["response_mask"][index])
  return pairs, {"tied_fraction": 1.0 - jnp.mean(pairs["valid"]), "score_gap": jnp.mean(gap)}


def online_dpo_loss_fn(config: ml_collections.ConfigDict, models: rollout_lib.Models):
  """loss_fn(params, extras, pairs, rng): the DPO-family loss of a minibatch of online pairs."""
  pc = config.ppo

  def loss_fn(params, extras, mb, rng):
    del rng
    p = mb["chosen_tokens"].shape[1] - mb["chosen_response_mask"].shape[1]
    cat = lambda key: jnp.concatenate([mb[f"chosen_{key}"], mb[f"rejected_{key}"]])
    logprobs = rollout_lib.response_outputs(models.policy, params["policy"], cat("tokens"),
                                            cat("mask"), p)["logprobs"]
    response_mask = cat("response_mask")
    logps = _sequence_sum(logprobs, response_mask)
    lengths = jnp.sum(response_mask, axis=1).astype(jnp.float32)
    n = mb["chosen_tokens"].shape[0]
    return preference.preference_loss(
        pc.dpo_loss, logps[:n], logps[n:], mb["reference_chosen_logps"],
        mb["reference_rejected_logps"], chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
        weights=mb["valid"], beta=extras["kl_coef"])

  return loss_fn


def make_loss_fn(config: ml_collections.ConfigDict, models: rollout_lib.Models):
  """loss_fn(params, extras, minibatch, rng) -> (loss, metrics) of one minibatch."""
  pc = config.ppo

  def loss_fn(params, extras, mb, rng):
    del rng
    p = mb["tokens"].shape[1] - mb["response_mask"].shape[1]
    mask = mb["response_mask"]
    out = rollout_lib.response_outputs(models.policy, params["policy"], mb["tokens"], mb["mask"],
                                       p, pc.temperature)
    if pc.algorithm == "grpo":
      # Shao et al. 2024, eq. 3: clipped surrogate with the k3 KL to the reference.
      policy_loss, m = pg.grpo_loss(out["logprobs"], mb["logprobs"], mb["ref_logprobs"],
                                    mb["sequence_advantages"], mask, pc.clip_eps,
                                    extras["kl_coef"])
      m = {"clipfrac": m["clipfrac"], "ratio": m["ratio"], "kl_loss_term": m["kl"]}
    else:
      # Schulman et al. 2017, eq. 7 (RLOO takes the same clipped form over its epochs).
      policy_loss, m = pg.ppo_policy_loss(out["logprobs"], mb["logprobs"], mb["advantages"],
                                          mask, pc.clip_eps)
      m = {"clipfrac": m["clipfrac"], "ratio": m["ratio"]}
    log_ratio = jnp.where(mask != 0, out["logprobs"] - mb["logprobs"], 0.0)
    entropy = pg.entropy_from_logits(out["logits"], mask)
    metrics = dict(m, policy_loss=policy_loss, entropy=entropy,
                   approx_kl=pg.masked_mean(jnp.expm1(log_ratio) - log_ratio, mask))
    loss = policy_loss - pc.entropy_coef * entropy
    if pc.algorithm == "ppo":
      if models.critic is not None:
        values = rollout_lib.response_outputs(models.critic, params["critic"], mb["tokens"],
                                              mb["mask"], p)["values"]
      else:
        values = out["values"]
      value_loss, vm = pg.ppo_value_loss(values, mb["values"], mb["returns"], mask,
                                         pc.value_clip_eps)
      loss = loss + pc.vf_coef * value_loss
      metrics.update(value_loss=value_loss, value_clipfrac=vm["clipfrac"])
    metrics["loss"] = loss
    return loss, metrics

  return loss_fn


_TRAIN_KEYS = ("tokens", "mask", "response_mask", "logprobs", "ref_logprobs", "values",
               "returns", "advantages", "sequence_advantages")


def make_step(config: ml_collections.ConfigDict):
  """(state, prompt batch, rng) -> (state, metrics): one RLHF iteration."""
  models = rollout_lib.make_models(config)
  reward_fn = rollout_lib.make_reward_fn(config, models)
  pc = config.ppo
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, num_updates(config))
  online_dpo = pc.algorithm == "online_dpo"
  loss_fn = (online_dpo_loss_fn if online_dpo else make_loss_fn)(config, models)
  batch_size = rollout_lib.rollout_batch_size(config)
  train_rows = config.data.batch_size if online_dpo else batch_size   # pairs or responses
  minibatch = train_rows // pc.num_minibatches
  accum = config.optimizer.grad_accum_steps

  def update(carry, inputs):
    params, opt_state, step, extras = carry
    mb, rng = inputs
    grads, metrics = step_lib.gradients(loss_fn, params, extras, mb, rng, accum)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=schedule(step))
    return (params, opt_state, step + 1, extras), metrics

  def epoch(carry, rng):
    data, carry = carry
    perm_rng, mb_rng = jax.random.split(rng)
    order = jax.random.permutation(perm_rng, train_rows).reshape(pc.num_minibatches, minibatch)
    minibatches = jax.tree.map(lambda x: x[order], data)
    carry, metrics = jax.lax.scan(update, carry, (minibatches, jax.random.split(
        mb_rng, pc.num_minibatches)))
    return (data, carry), metrics

  def step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    rollout_rng, train_rng = jax.random.split(rng)
    prompt_tokens, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"]
    if pc.samples_per_prompt > 1:   # the k samples of a prompt are contiguous rows
      prompt_tokens = jnp.repeat(prompt_tokens, pc.samples_per_prompt, axis=0)
      prompt_mask = jnp.repeat(prompt_mask, pc.samples_per_prompt, axis=0)
    kl_coef = state.extras["kl_coef"]
    ro = rollout_lib.rollout(config, models, reward_fn, state.params, state.extras,
                             prompt_tokens, prompt_mask, rollout_rng)
    if online_dpo:
      data, metrics = preference_pairs(dict(ro, scores=penalised_scores(config, ro)),
                                       pc.samples_per_prompt)
    else:
      ro, metrics = advantages(config, ro, kl_coef)
      data = {k: v for k, v in ro.items() if k in _TRAIN_KEYS}
    carry = (state.params, state.opt_state, state.step, state.extras)
    (_, (params, opt_state, step, _)), train_metrics = jax.lax.scan(
        epoch, (data, carry), jax.random.split(train_rng, pc.epochs))
    metrics.update(jax.tree.map(jnp.mean, train_metrics))

    mask = ro["response_mask"]
    sequence_kl = _sequence_sum(ro["logprobs"] - ro["ref_logprobs"], mask)   # k1, MC estimate
    finite = jnp.all(jnp.isfinite(ro["scores"]))
    real = mask != 0
    metrics.update(
        score=jnp.mean(ro["scores"]), score_std=jnp.std(ro["scores"]),
        kl=jnp.mean(sequence_kl), kl_coef=kl_coef,
        response_length=jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        no_eos_fraction=1.0 - jnp.mean(ro["contains_eos"].astype(jnp.float32)),
        sampler_logprob_diff=jnp.max(jnp.where(real, jnp.abs(ro["sampler_logprobs"]
                                                              - ro["logprobs"]), 0.0)),
        # A non-finite score (reported on the host by rollout.checked_scores) must stop the run.
        loss=jnp.where(finite, metrics["loss"], jnp.nan))
    if pc.adaptive_kl:
      kl_coef = pg.adaptive_kl_update(kl_coef, jnp.mean(sequence_kl), batch_size, pc.kl_target,
                                      pc.kl_horizon)
    extras = dict(state.extras, kl_coef=jnp.asarray(kl_coef, jnp.float32))
    state = state.replace(step=step, params=params, opt_state=opt_state, extras=extras)
    return state, metrics

  return step


# ------------------------------------------------------------------------ evaluate

def evaluate(config, state, data, mesh, rng) -> dict:
  """Held-out prompts, sampled at temperature 1: `rollout.sampled_policy_metrics` (gold
  reward, MC KL to the reference, length, diversity, learned-RM score, sample texts)."""
  models = rollout_lib.make_models(config)
  return rollout_lib.sampled_policy_metrics(
      models.policy, state.params["policy"], models.reference, state.extras["reference"],
      data.eval(), mesh, rng, tokenizer=tokenizers.make_tokenizer(config.tokenizer),
      max_new_tokens=config.ppo.max_new_tokens, num_texts=config.ppo.eval_samples,
      reward=models.reward, reward_params=state.extras.get("reward"),
      pooling=models.reward_pooling)
