"""RLHF with PPO (Ouyang et al. 2022, InstructGPT; Huang et al. 2024, "The N+
implementation details of RLHF with PPO"), its critic-free cousins RLOO (Ahmadian
et al. 2024) and GRPO (Shao et al. 2024), and online DPO (Guo et al. 2024, "Direct
language model alignment from online AI feedback"), as `config.rl.algorithm`: each
algorithm is one record of `rl/algorithms.py` (advantages, loss, critic, sample rules).

Online DPO is the DPO stage's loss on pairs the current policy samples: each iteration
is one round of iterative DPO (rounds = `config.train.num_steps`): `samples_per_prompt`
responses to each of `config.data.batch_size` prompts, the reward (`config.rl.reward`:
the learned model or a text reward) picks the best and the worst (ties drop out of the loss), and
`epochs` x `num_minibatches` DPO updates train on those pairs against the frozen
reference, with beta = `kl_coef`.

One step is one iteration, a single pure function:
  1. rollout (rl/rollout.py): sample `samples_per_prompt` responses per prompt with
     the KV-cache sampler; full forward passes give the policy's and the reference's
     per-token log-probs (logits / temperature, so the first ratio is exactly 1), the
     critic's values, and the reward function's sequence score;
  2. the algorithm's estimator: PPO shapes per-token rewards (-beta KL_t, plus the score
     at the last token) and runs GAE; RLOO uses the KL-penalised sequence reward minus
     the leave-one-out mean; GRPO the group-normalised score (its KL is in the loss);
     online DPO forms pairs instead (`algorithms.preference_pairs`);
  3. `epochs` passes over the rollout in `num_minibatches` shuffled minibatches inside
     `lax.scan`, one optimizer update each through `train/step.update` (the algorithm's
     loss: clipped surrogate, clipped value loss, entropy bonus; or the DPO loss;
     global-norm clipping is in the optimizer);
  4. the adaptive KL controller (Ziegler et al. 2019, eq. 2) updates `extras['kl_coef']`.

State: `params = {'policy', ['critic']}` (one optimizer); frozen `extras = {'reference',
['reward'], 'kl_coef'}`. `state.step` counts optimizer updates (epochs x minibatches per
iteration), and so does the learning-rate schedule.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import tokenizers
from rlhf_jax.data import collate
from rlhf_jax.data import pipeline
from rlhf_jax.data import sources
from rlhf_jax.data import tfds_builders
from rlhf_jax.model import transformer
from rlhf_jax.objectives import policy_gradient as pg
from rlhf_jax.rl import algorithms
from rlhf_jax.rl import evaluation
from rlhf_jax.rl import models as models_lib
from rlhf_jax.rl import rewards
from rlhf_jax.rl import rollout as rollout_lib
from rlhf_jax.stages import common
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import loop
from rlhf_jax.train import optimizer as optimizer_lib
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import step as step_lib


def num_updates(config: ml_collections.ConfigDict) -> int:
  """Optimizer updates over the run: iterations x epochs x minibatches."""
  return config.train.num_steps * config.rl.epochs * config.rl.num_minibatches


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
  from `config.rl.reward_checkpoint`. Without a reward checkpoint the separate critic is
  the policy's trunk; a value head that does not come from the reward model starts at 0."""
  models = models_lib.make_models(config)
  rl = config.rl
  tx = optimizer_lib.make_optimizer(config.optimizer, num_updates(config)).tx

  def init_fn(r):
    r_policy, r_critic, r_reward = jax.random.split(r, 3)
    params = {"policy": transformer.init_params(models.policy, r_policy)}
    if models.critic is not None:
      params["critic"] = transformer.init_params(models.critic, r_critic)
    extras = {"kl_coef": jnp.asarray(rl.kl_coef, jnp.float32)}
    if models.reward is not None:
      extras["reward"] = transformer.init_params(models.reward, r_reward)
    return state_lib.TrainState.create(params=params, tx=tx, extras=extras)

  state, _ = sharding_lib.init_sharded(init_fn, rng, mesh, sharding_lib.rules(config))
  params, extras = dict(state.params), dict(state.extras)
  params["policy"] = common.load_initial_params(config, params["policy"])
  if models.reward is not None:
    extras["reward"] = checkpoint_lib.load_params(rl.reward_checkpoint, extras["reward"])
  # A value head not from the reward model starts at V = 0: advantages then begin as
  # (whitened) returns, not returns minus a random function of the prefix.
  if models.critic is not None:
    params["critic"] = (checkpoint_lib.load_params(rl.reward_checkpoint, params["critic"])
                        if rl.reward_checkpoint
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

def make_step(config: ml_collections.ConfigDict):
  """(state, prompt batch, rng) -> (state, metrics): one RLHF iteration."""
  models = models_lib.make_models(config)
  algorithm = algorithms.get(config)
  reward_fn = rewards.get(config).make_fn(config, models)
  rl = config.rl
  optimizer = optimizer_lib.make_optimizer(config.optimizer, num_updates(config))
  loss_fn = algorithm.make_loss(config, models)
  batch_size = rollout_lib.rollout_batch_size(config)
  train_rows = algorithm.rows.count(config)   # responses or pairs
  minibatch = train_rows // rl.num_minibatches
  accum = config.optimizer.grad_accum_steps

  def update(state, inputs):
    mb, rng = inputs
    return step_lib.update(loss_fn, optimizer, state, mb, rng, accum)

  def epoch(carry, rng):
    data, state = carry
    perm_rng, mb_rng = jax.random.split(rng)
    order = jax.random.permutation(perm_rng, train_rows).reshape(rl.num_minibatches, minibatch)
    minibatches = jax.tree.map(lambda x: x[order], data)
    state, metrics = jax.lax.scan(update, state, (minibatches, jax.random.split(
        mb_rng, rl.num_minibatches)))
    return (data, state), metrics

  def step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    rollout_rng, train_rng = jax.random.split(rng)
    prompt_tokens, prompt_mask = batch["prompt_tokens"], batch["prompt_mask"]
    if rl.samples_per_prompt > 1:   # the k samples of a prompt are contiguous rows
      prompt_tokens = jnp.repeat(prompt_tokens, rl.samples_per_prompt, axis=0)
      prompt_mask = jnp.repeat(prompt_mask, rl.samples_per_prompt, axis=0)
    kl_coef = state.extras["kl_coef"]
    ro = rollout_lib.rollout(config, models, reward_fn, state.params, state.extras,
                             prompt_tokens, prompt_mask, rollout_rng)
    data, metrics = algorithm.advantages(config, ro, kl_coef)
    data = algorithm.rows.select(data)
    (_, state), train_metrics = jax.lax.scan(epoch, (data, state),
                                             jax.random.split(train_rng, rl.epochs))
    metrics.update(jax.tree.map(jnp.mean, train_metrics))

    mask = ro["response_mask"]
    sequence_kl = pg.sequence_sum(ro["logprobs"] - ro["ref_logprobs"], mask)   # k1, MC estimate
    finite = jnp.all(jnp.isfinite(ro["scores"]))
    real = mask != 0
    metrics.update(
        score=jnp.mean(ro["scores"]), score_std=jnp.std(ro["scores"]),
        kl=jnp.mean(sequence_kl), kl_coef=kl_coef,
        response_length=jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        no_eos_fraction=1.0 - jnp.mean(ro["contains_eos"].astype(jnp.float32)),
        sampler_logprob_diff=jnp.max(jnp.where(real, jnp.abs(ro["sampler_logprobs"]
                                                              - ro["logprobs"]), 0.0)),
        # A non-finite score (reported on the host by rewards.checked_scores) must stop the run.
        loss=jnp.where(finite, metrics["loss"], jnp.nan))
    if rl.adaptive_kl:
      kl_coef = pg.adaptive_kl_update(kl_coef, jnp.mean(sequence_kl), batch_size, rl.kl_target,
                                      rl.kl_horizon)
    extras = dict(state.extras, kl_coef=jnp.asarray(kl_coef, jnp.float32))
    return state.replace(extras=extras), metrics

  return step


# ------------------------------------------------------------------------ evaluate

def evaluate(config, state, data, mesh, rng) -> dict:
  """Held-out prompts, sampled at temperature 1: `rl.evaluation.sampled_policy_metrics`
  (gold reward, MC KL to the reference, length, diversity, learned-RM score, sample texts)."""
  models = models_lib.make_models(config)
  return evaluation.sampled_policy_metrics(
      models.policy, state.params["policy"], models.reference, state.extras["reference"],
      data.eval(), mesh, rng, tokenizer=tokenizers.make_tokenizer(config.tokenizer),
      max_new_tokens=config.sampling.max_new_tokens, num_texts=config.sampling.eval_texts,
      reward=models.reward, reward_params=state.extras.get("reward"),
      pooling=models.reward_pooling, gold_reward=config.sampling.gold_reward)
