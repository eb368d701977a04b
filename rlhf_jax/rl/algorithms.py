"""RL algorithms by name (`config.rl.algorithm`): one record each, nothing else decides.

An algorithm is an advantage estimator (what it makes of a rollout), a minibatch loss,
whether it trains a critic, how many samples per prompt it needs, which rows it trains
on (responses, or pairs of them) and any checks of its own config fields. The RL stage
(`stages/ppo.py`) runs every algorithm with the same rollout and the same epochs of
minibatch updates. To add one: write its estimator and loss here, `ALGORITHMS.register`
it, and test its advantages against a NumPy formula (tests/rl/test_algorithms.py).

  ppo         PPO with GAE and a critic (Ouyang et al. 2022; Huang et al. 2024)
  rloo        REINFORCE leave-one-out on the KL-penalised sequence reward (Ahmadian et al. 2024)
  grpo        group-normalised score, k3 KL in the loss (Shao et al. 2024)
  online_dpo  DPO on the best and worst of k samples a prompt (Guo et al. 2024)

Rollout arrays are those of `rl.rollout.rollout`: `[batch, n]` per token, `[batch]` per
response; the k samples of a prompt are contiguous rows.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import registry
from rlhf_jax.objectives import policy_gradient as pg
from rlhf_jax.objectives import preference
from rlhf_jax.rl import rollout as rollout_lib
from rlhf_jax.train import step as step_lib

Config = ml_collections.ConfigDict
# advantages(config, rollout, kl_coef) -> (training data, metrics of scalars)
Estimator = Callable[[Config, dict, jax.Array], tuple[dict, dict]]
# make_loss(config, models) -> loss_fn(params, extras, minibatch, rng) -> (loss, metrics)
LossFactory = Callable[[Config, Any], step_lib.LossFn]
# check(config, fail): calls fail(field under config., message) on a bad field
Check = Callable[[Config, Callable[[str, str], None]], None]


@dataclasses.dataclass(frozen=True)
class TrainingRows:
  """What one training row is: its count per iteration and the rollout columns it keeps."""
  description: str
  count: Callable[[Config], int]
  keys: tuple[str, ...] | None = None   # None: every column of the estimator's output

  def select(self, data: dict) -> dict:
    return data if self.keys is None else {k: v for k, v in data.items() if k in self.keys}


RESPONSES = TrainingRows(
    "responses (config.data.batch_size x samples_per_prompt)", rollout_lib.rollout_batch_size,
    ("tokens", "mask", "response_mask", "logprobs", "ref_logprobs", "values", "returns",
     "advantages", "sequence_advantages"))
PAIRS = TrainingRows("pairs (config.data.batch_size)", lambda config: config.data.batch_size)


def _no_checks(config, fail):
  del config, fail


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """An RL algorithm as a record (see the module docstring)."""
  name: str
  advantages: Estimator
  make_loss: LossFactory
  has_critic: bool = False
  min_samples_per_prompt: int = 1
  rows: TrainingRows = RESPONSES
  check: Check = _no_checks


ALGORITHMS: registry.Registry[Algorithm] = registry.Registry(
    "RL algorithm", "config.rl.algorithm", hint="registered in rlhf_jax/rl/algorithms.py")


def get(config: Config) -> Algorithm:
  """The record named by `config.rl.algorithm` (ValueError naming the known ones)."""
  return ALGORITHMS.get(config.rl.algorithm)


# ------------------------------------------------------------------------ shared pieces

def penalised_scores(config: Config, ro: dict) -> jax.Array:
  """`[batch]` scores less `missing_eos_penalty` for responses that never emit EOS
  (Huang et al. 2024, detail "EOS trick")."""
  return ro["scores"] - jnp.where(ro["contains_eos"], 0.0, config.rl.missing_eos_penalty)


def _sequence_rewards(config: Config, ro: dict, kl_coef) -> tuple[jax.Array, jax.Array, dict]:
  """(penalised scores, KL-penalised sequence reward `[batch]`, metrics)."""
  scores = penalised_scores(config, ro)
  penalty = pg.kl_penalty(ro["logprobs"], ro["ref_logprobs"], config.rl.kl_estimator)
  rlhf_reward = scores - kl_coef * pg.sequence_sum(penalty, ro["response_mask"])
  return scores, rlhf_reward, {"rlhf_reward": jnp.mean(rlhf_reward)}


def _with_advantages(ro: dict, adv, whiten: bool, **columns) -> dict:
  """The rollout plus `advantages` `[batch, n]` (whitened over the rollout when asked, 0
  where masked) and any other `columns`."""
  mask = ro["response_mask"]
  if whiten:
    adv = pg.whiten(adv, mask)
  return dict(ro, advantages=jnp.where(mask != 0, adv, 0.0), **columns)


def _per_token(sequence_values, ro: dict) -> jax.Array:
  return sequence_values[:, None] * jnp.ones_like(ro["logprobs"])


def explained_variance(values, returns, mask):
  """1 - Var[returns - values] / Var[returns] over response tokens."""
  var = lambda x: pg.masked_mean(jnp.square(x - pg.masked_mean(x, mask)), mask)
  return 1.0 - var(returns - values) / jnp.maximum(var(returns), 1e-8)


def clipped_policy_loss(surrogate, value_loss: bool = False) -> LossFactory:
  """The loss of a clipped-ratio algorithm: `surrogate(rl, out, mb, mask, extras) ->
  (policy_loss, metrics)` on the policy's forward pass, minus the entropy bonus, plus (with
  `value_loss`) the clipped value loss of the critic."""
  def make_loss(config: Config, models):
    rl, temperature = config.rl, config.sampling.temperature

    def loss_fn(params, extras, mb, rng):
      del rng
      p = mb["tokens"].shape[1] - mb["response_mask"].shape[1]
      mask = mb["response_mask"]
      out = rollout_lib.response_outputs(models.policy, params["policy"], mb["tokens"],
                                         mb["mask"], p, temperature)
      policy_loss, m = surrogate(rl, out, mb, mask, extras)
      log_ratio = jnp.where(mask != 0, out["logprobs"] - mb["logprobs"], 0.0)
      entropy = pg.entropy_from_logits(out["logits"], mask)
      metrics = dict(m, policy_loss=policy_loss, entropy=entropy,
                     approx_kl=pg.masked_mean(jnp.expm1(log_ratio) - log_ratio, mask))
      loss = policy_loss - rl.entropy_coef * entropy
      if value_loss:
        if models.critic is not None:
          values = rollout_lib.response_outputs(models.critic, params["critic"], mb["tokens"],
                                                mb["mask"], p)["values"]
        else:   # shared critic: the value head on the policy's trunk
          values = out["values"]
        v_loss, vm = pg.ppo_value_loss(values, mb["values"], mb["returns"], mask,
                                       rl.value_clip_eps)
        loss = loss + rl.vf_coef * v_loss
        metrics.update(value_loss=v_loss, value_clipfrac=vm["clipfrac"])
      metrics["loss"] = loss
      return loss, metrics

    return loss_fn
  return make_loss


def ppo_surrogate(rl, out, mb, mask, extras):
  """Schulman et al. 2017, eq. 7 (RLOO takes the same clipped form over its epochs)."""
  del extras
  loss, m = pg.ppo_policy_loss(out["logprobs"], mb["logprobs"], mb["advantages"], mask,
                               rl.clip_eps)
  return loss, {"clipfrac": m["clipfrac"], "ratio": m["ratio"]}


# ------------------------------------------------------------------------ PPO

def ppo_advantages(config: Config, ro: dict, kl_coef) -> tuple[dict, dict]:
  """Per-token rewards (-beta KL_t, plus the score at the last token), optionally
  scale-whitened, then GAE; adds `advantages` and `returns`."""
  rl, mask = config.rl, ro["response_mask"]
  scores, _, metrics = _sequence_rewards(config, ro, kl_coef)
  rewards = pg.shaped_rewards(scores, ro["logprobs"], ro["ref_logprobs"], mask, kl_coef,
                              rl.kl_estimator)
  if rl.whiten_rewards:   # scale only: the KL penalty keeps its sign
    rewards = pg.whiten(rewards, mask, shift_mean=False)
  adv, returns = pg.gae(rewards, ro["values"], mask, rl.gamma, rl.lam)
  metrics.update(explained_variance=explained_variance(ro["values"], returns, mask),
                 value_mean=pg.masked_mean(ro["values"], mask),
                 return_mean=pg.masked_mean(returns, mask))
  return _with_advantages(ro, adv, rl.whiten_advantages, returns=returns), metrics


ALGORITHMS.register("ppo", Algorithm(
    "ppo", ppo_advantages, clipped_policy_loss(ppo_surrogate, value_loss=True),
    has_critic=True))


# ------------------------------------------------------------------------ RLOO

def rloo_advantages(config: Config, ro: dict, kl_coef) -> tuple[dict, dict]:
  """The KL-penalised sequence reward minus the mean of the prompt's other k - 1 samples."""
  _, rlhf_reward, metrics = _sequence_rewards(config, ro, kl_coef)
  adv = _per_token(pg.rloo_advantages(rlhf_reward, config.rl.samples_per_prompt), ro)
  return _with_advantages(ro, adv, config.rl.whiten_advantages), metrics


ALGORITHMS.register("rloo", Algorithm(
    "rloo", rloo_advantages, clipped_policy_loss(ppo_surrogate), min_samples_per_prompt=2))


# ------------------------------------------------------------------------ GRPO

def grpo_advantages(config: Config, ro: dict, kl_coef) -> tuple[dict, dict]:
  """The score alone, normalised within each prompt's group (never whitened again); its
  KL is a loss term. Adds `sequence_advantages` `[batch]` for the loss."""
  scores, _, metrics = _sequence_rewards(config, ro, kl_coef)
  sequence = pg.grpo_advantages(scores, config.rl.samples_per_prompt)
  return _with_advantages(ro, _per_token(sequence, ro), False,
                          sequence_advantages=sequence), metrics


def grpo_surrogate(rl, out, mb, mask, extras):
  """Shao et al. 2024, eq. 3: clipped surrogate with the k3 KL to the reference."""
  loss, m = pg.grpo_loss(out["logprobs"], mb["logprobs"], mb["ref_logprobs"],
                         mb["sequence_advantages"], mask, rl.clip_eps, extras["kl_coef"])
  return loss, {"clipfrac": m["clipfrac"], "ratio": m["ratio"], "kl_loss_term": m["kl"]}


ALGORITHMS.register("grpo", Algorithm(
    "grpo", grpo_advantages, clipped_policy_loss(grpo_surrogate), min_samples_per_prompt=2))


# ------------------------------------------------------------------------ online DPO

ONLINE_DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")   # paired, with a reference


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
  rows = {"chosen": base + jnp.argmax(scores, axis=1),
          "rejected": base + jnp.argmin(scores, axis=1)}
  gap = jnp.max(scores, axis=1) - jnp.min(scores, axis=1)
  pairs = {"valid": (gap > 0).astype(jnp.float32)}
  for name, index in rows.items():
    for key in ("tokens", "mask", "response_mask"):
      pairs[f"{name}_{key}"] = ro[key][index]
    pairs[f"reference_{name}_logps"] = pg.sequence_sum(ro["ref_logprobs"][index],
                                                       ro["response_mask"][index])
  return pairs, {"tied_fraction": 1.0 - jnp.mean(pairs["valid"]), "score_gap": jnp.mean(gap)}


def online_dpo_pairs(config: Config, ro: dict, kl_coef) -> tuple[dict, dict]:
  """`preference_pairs` ranked on the EOS-penalised scores (as PPO's reward sees them)."""
  del kl_coef   # beta enters the loss
  return preference_pairs(dict(ro, scores=penalised_scores(config, ro)),
                          config.rl.samples_per_prompt)


def online_dpo_loss(config: Config, models) -> step_lib.LossFn:
  """loss_fn(params, extras, pairs, rng): the DPO-family loss of a minibatch of online pairs,
  beta = `extras['kl_coef']`."""
  rl = config.rl

  def loss_fn(params, extras, mb, rng):
    del rng
    p = mb["chosen_tokens"].shape[1] - mb["chosen_response_mask"].shape[1]
    cat = lambda key: jnp.concatenate([mb[f"chosen_{key}"], mb[f"rejected_{key}"]])
    logprobs = rollout_lib.response_outputs(models.policy, params["policy"], cat("tokens"),
                                            cat("mask"), p)["logprobs"]
    response_mask = cat("response_mask")
    logps = pg.sequence_sum(logprobs, response_mask)
    lengths = jnp.sum(response_mask, axis=1).astype(jnp.float32)
    n = mb["chosen_tokens"].shape[0]
    return preference.preference_loss(
        rl.dpo_loss, logps[:n], logps[n:], mb["reference_chosen_logps"],
        mb["reference_rejected_logps"], chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
        weights=mb["valid"], beta=extras["kl_coef"])

  return loss_fn


def check_online_dpo(config: Config, fail) -> None:
  if config.rl.dpo_loss not in ONLINE_DPO_LOSSES:
    fail("rl.dpo_loss", f"expected one of {ONLINE_DPO_LOSSES}, got {config.rl.dpo_loss!r}")
  if config.sampling.temperature != 1.0:
    fail("sampling.temperature", "online_dpo compares the policy's own log-probs: sample at "
         f"1.0, got {config.sampling.temperature}")


ALGORITHMS.register("online_dpo", Algorithm(
    "online_dpo", online_dpo_pairs, online_dpo_loss, min_samples_per_prompt=2, rows=PAIRS,
    check=check_online_dpo))
