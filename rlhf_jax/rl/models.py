"""The RL stage's models and the config checks made before any of them is built.

The reward model's architecture and pooling come from its own run's config.json (it may
be smaller than the policy); the critic, when the algorithm has one, is a separate
scalar-head model initialised from the reward model (InstructGPT) or a value head on
the policy's trunk (`config.rl.critic`).
"""

import dataclasses
import json
import os

import ml_collections

from rlhf_jax.model import transformer
from rlhf_jax.rl import algorithms
from rlhf_jax.rl import rewards
from rlhf_jax.stages import reward as reward_lib

CRITICS = ("separate", "shared")
KL_ESTIMATORS = ("k1", "k3")


@dataclasses.dataclass(frozen=True)
class Models:
  """The modules an RL stage runs (hashable: usable as a jit cache key).

  policy: 'lm' head (plus 'scalar', the value head, when the critic is shared).
  reference: the policy's trunk with the 'lm' head only (frozen params in extras).
  critic: a separate scalar-head model, or None (shared value head, no critic).
  reward: the learned reward model, or None (a text reward).
  reward_pooling: how the reward model reads its scalar head (`reward.score`).
  """
  policy: transformer.Transformer
  reference: transformer.Transformer
  critic: transformer.Transformer | None
  reward: transformer.Transformer | None
  reward_pooling: str = "last"


def find_config_json(path: str) -> str:
  """config.json of a workdir, given the workdir, its checkpoints/ folder or a step folder."""
  path = os.path.abspath(path)
  for directory in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    candidate = os.path.join(directory, "config.json")
    if os.path.isfile(candidate):
      return candidate
  raise ValueError(f"config.rl.reward_checkpoint={path!r}: no config.json in it or its "
                   "parents; the reward model's architecture is read from the reward run's "
                   "config.json (written by the training loop)")


def reward_model_config(
    config: ml_collections.ConfigDict) -> tuple[transformer.TransformerConfig, str]:
  """The reward model's architecture (may differ from the policy's) and its pooling
  (`reward.score`), from its run's config.json."""
  path = find_config_json(config.rl.reward_checkpoint)
  with open(path) as f:
    saved = json.load(f)
  if "model" not in saved:
    raise ValueError(f"{path}: no 'model' section; cannot build the reward model")
  saved_tok = saved.get("tokenizer", {})
  ours = config.tokenizer.to_dict()
  if saved_tok and ((saved_tok.get("kind"), saved_tok.get("path", ""))
                    != (ours["kind"], ours["path"])):
    raise ValueError(f"{path}: the reward model was trained with tokenizer {saved_tok}, the "
                     f"policy uses config.tokenizer={ours}; they must be the same")
  pooling = reward_lib.pooling_of(saved)
  reward_lib.check_pooling(pooling, f"{path}: reward.pooling")
  try:
    return transformer.TransformerConfig.from_dict(saved["model"]), pooling
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def make_models(config: ml_collections.ConfigDict) -> Models:
  """The stage's models, after `check_config`; reads the reward run's config.json when
  there is a reward checkpoint."""
  rl = config.rl
  check_config(config)
  has_critic = algorithms.get(config).has_critic
  policy_config = transformer.TransformerConfig.from_dict(config.model)
  shared = has_critic and rl.critic == "shared"
  rm_config, pooling = reward_model_config(config) if rl.reward_checkpoint else (None, "last")
  reward = None
  if rewards.get(config).uses_reward_model:
    reward = transformer.Transformer(rm_config, heads=reward_lib.HEADS)
  critic = None
  if has_critic and rl.critic == "separate":
    # InstructGPT initialises the value function from the reward model.
    critic = transformer.Transformer(rm_config or policy_config, heads=("scalar",))
  max_new_tokens = config.sampling.max_new_tokens
  needed = config.data.prompt_len + max_new_tokens
  for name, m in (("policy", policy_config), ("reward model", rm_config),
                  ("critic", critic.config if critic else None)):
    if m is not None and m.max_len < needed:
      raise ValueError(f"{name}: max_len={m.max_len} < config.data.prompt_len "
                       f"({config.data.prompt_len}) + config.sampling.max_new_tokens "
                       f"({max_new_tokens})")
  return Models(
      policy=transformer.Transformer(policy_config, heads=("lm", "scalar") if shared else ("lm",)),
      reference=transformer.Transformer(policy_config, heads=("lm",)),
      critic=critic, reward=reward, reward_pooling=pooling)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad `config.rl` / `config.sampling` field; unknown
  algorithm and reward names list the registered ones."""
  rl = config.rl
  def fail(field, msg):
    raise ValueError(f"config.{field}: {msg}")
  algorithm = algorithms.get(config)
  reward = rewards.get(config)
  if rl.critic not in CRITICS:
    fail("rl.critic", f"expected one of {CRITICS}, got {rl.critic!r}")
  if reward.uses_reward_model and not rl.reward_checkpoint:
    fail("rl.reward_checkpoint", f"reward={rl.reward!r} needs a reward-stage workdir")
  if rl.kl_estimator not in KL_ESTIMATORS:
    fail("rl.kl_estimator", f"expected one of {KL_ESTIMATORS}, got {rl.kl_estimator!r}")
  if rl.samples_per_prompt < algorithm.min_samples_per_prompt:
    fail("rl.samples_per_prompt", f"{algorithm.name} needs >= "
         f"{algorithm.min_samples_per_prompt} samples per prompt, got {rl.samples_per_prompt}")
  if not config.sampling.temperature > 0:
    fail("sampling.temperature", f"must be > 0, got {config.sampling.temperature}")
  if config.sampling.max_new_tokens < 1:
    fail("sampling.max_new_tokens", f"must be >= 1, got {config.sampling.max_new_tokens}")
  if rl.epochs < 1 or rl.num_minibatches < 1:
    fail("rl.epochs" if rl.epochs < 1 else "rl.num_minibatches", "must be >= 1")
  algorithm.check(config, fail)
  rows = algorithm.rows.count(config)
  if rows % (rl.num_minibatches * config.optimizer.grad_accum_steps):
    fail("rl.num_minibatches", f"the rollout's {rows} {algorithm.rows.description} do not "
         f"split into {rl.num_minibatches} minibatches of "
         f"{config.optimizer.grad_accum_steps} micro-batches")
  if rl.adaptive_kl and not (rl.kl_target > 0 and rl.kl_horizon > 0):
    fail("rl.kl_target", "the adaptive KL controller needs kl_target > 0 and kl_horizon > 0")
