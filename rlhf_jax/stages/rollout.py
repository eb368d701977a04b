"""The RL stages' experience: models, reward functions and one batched rollout.

A rollout samples responses to left-padded prompts with the KV-cache sampler, then
scores every response token in one full forward pass per model: log-probs of the
policy and of the frozen reference, values of the critic, and a sequence score from a
reward function. Everything is jittable: the gold reward reaches the host through
`jax.pure_callback`, so the whole PPO iteration stays one pure function.

Per-token arrays are `[batch, n]`, n = max_new_tokens, aligned with `response_mask`.
Token `t` of the response is predicted from position `P - 1 + t` of the sequence
`[prompt (P, left-padded), response (n)]`; the value of that state is read at the same
position (Huang et al. 2024, "The N+ implementation details of RLHF with PPO": values
and log-probs both come from `[:, P - 1 : -1]`).
"""

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import tokenizers
from rlhf_jax.model import sampling
from rlhf_jax.model import transformer
from rlhf_jax.objectives import sft as sft_objective
from rlhf_jax.stages import common
from rlhf_jax.stages import reward as reward_lib
from rlhf_jax.testbed import evaluation
from rlhf_jax.testbed import gold_reward
from rlhf_jax.train import sharding as sharding_lib

ALGORITHMS = ("ppo", "rloo", "grpo", "online_dpo")
ONLINE_DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")   # paired, with a reference
CRITICS = ("separate", "shared")
REWARDS = ("model", "gold")

# reward_fn(extras, sample) -> scores [batch] float32. `sample` is a SampleOutput.
RewardFn = Callable[[Any, sampling.SampleOutput], jax.Array]


@dataclasses.dataclass(frozen=True)
class Models:
  """The modules an RL stage runs (hashable: usable as a jit cache key).

  policy: 'lm' head (plus 'scalar', the value head, when the critic is shared).
  reference: the policy's trunk with the 'lm' head only (frozen params in extras).
  critic: a separate scalar-head model, or None (shared value head, RLOO, GRPO).
  reward: the learned reward model, or None (gold reward).
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
  raise ValueError(f"config.ppo.reward_checkpoint={path!r}: no config.json in it or its "
                   "parents; the reward model's architecture is read from the reward run's "
                   "config.json (written by the training loop)")


def reward_model_config(
    config: ml_collections.ConfigDict) -> tuple[transformer.TransformerConfig, str]:
  """The reward model's architecture (may differ from the policy's) and its pooling
  (`reward.score`), from its run's config.json."""
  path = find_config_json(config.ppo.reward_checkpoint)
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
  """The stage's models; reads the reward run's config.json when there is a reward model."""
  pc = config.ppo
  check_config(config)
  policy_config = transformer.TransformerConfig.from_dict(config.model)
  shared = pc.algorithm == "ppo" and pc.critic == "shared"
  rm_config, pooling = reward_model_config(config) if pc.reward_checkpoint else (None, "last")
  reward = None
  if pc.reward == "model":
    reward = transformer.Transformer(rm_config, heads=reward_lib.HEADS)
  critic = None
  if pc.algorithm == "ppo" and pc.critic == "separate":
    # InstructGPT initialises the value function from the reward model.
    critic = transformer.Transformer(rm_config or policy_config, heads=("scalar",))
  needed = config.data.prompt_len + pc.max_new_tokens
  for name, m in (("policy", policy_config), ("reward model", rm_config),
                  ("critic", critic.config if critic else None)):
    if m is not None and m.max_len < needed:
      raise ValueError(f"{name}: max_len={m.max_len} < config.data.prompt_len "
                       f"({config.data.prompt_len}) + config.ppo.max_new_tokens "
                       f"({pc.max_new_tokens})")
  return Models(
      policy=transformer.Transformer(policy_config, heads=("lm", "scalar") if shared else ("lm",)),
      reference=transformer.Transformer(policy_config, heads=("lm",)),
      critic=critic, reward=reward, reward_pooling=pooling)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad `config.ppo` field."""
  pc = config.ppo
  def fail(field, msg):
    raise ValueError(f"config.ppo.{field}: {msg}")
  if pc.algorithm not in ALGORITHMS:
    fail("algorithm", f"expected one of {ALGORITHMS}, got {pc.algorithm!r}")
  if pc.critic not in CRITICS:
    fail("critic", f"expected one of {CRITICS}, got {pc.critic!r}")
  if pc.reward not in REWARDS:
    fail("reward", f"expected one of {REWARDS}, got {pc.reward!r}")
  if pc.reward == "model" and not pc.reward_checkpoint:
    fail("reward_checkpoint", "reward='model' needs a reward-stage workdir")
  if pc.kl_estimator not in ("k1", "k3"):
    fail("kl_estimator", f"expected 'k1' or 'k3', got {pc.kl_estimator!r}")
  if pc.algorithm in ("rloo", "grpo", "online_dpo") and pc.samples_per_prompt < 2:
    fail("samples_per_prompt", f"{pc.algorithm} needs >= 2 samples per prompt, got "
         f"{pc.samples_per_prompt}")
  if pc.algorithm == "ppo" and pc.samples_per_prompt < 1:
    fail("samples_per_prompt", f"must be >= 1, got {pc.samples_per_prompt}")
  if not pc.temperature > 0:
    fail("temperature", f"must be > 0, got {pc.temperature}")
  if pc.max_new_tokens < 1:
    fail("max_new_tokens", f"must be >= 1, got {pc.max_new_tokens}")
  if pc.epochs < 1 or pc.num_minibatches < 1:
    fail("epochs" if pc.epochs < 1 else "num_minibatches", "must be >= 1")
  if pc.algorithm == "online_dpo":
    if pc.dpo_loss not in ONLINE_DPO_LOSSES:
      fail("dpo_loss", f"expected one of {ONLINE_DPO_LOSSES}, got {pc.dpo_loss!r}")
    if pc.temperature != 1.0:
      fail("temperature", "online_dpo compares the policy's own log-probs: sample at 1.0, got "
           f"{pc.temperature}")
  rows, what = ((config.data.batch_size, "pairs (config.data.batch_size)")
                if pc.algorithm == "online_dpo" else
                (rollout_batch_size(config),
                 "responses (config.data.batch_size x samples_per_prompt)"))
  if rows % (pc.num_minibatches * config.optimizer.grad_accum_steps):
    fail("num_minibatches", f"the rollout's {rows} {what} do not split into "
         f"{pc.num_minibatches} minibatches of {config.optimizer.grad_accum_steps} micro-batches")
  if pc.adaptive_kl and not (pc.kl_target > 0 and pc.kl_horizon > 0):
    fail("kl_target", "the adaptive KL controller needs kl_target > 0 and kl_horizon > 0")


def rollout_batch_size(config: ml_collections.ConfigDict) -> int:
  """Responses per iteration: prompts per batch x samples per prompt."""
  return config.data.batch_size * config.ppo.samples_per_prompt


def response_outputs(model, params, tokens, mask, prompt_len: int, temperature: float = 1.0):
  """One full forward pass over `[prompt, response]`, sliced to the response.

  Args:
    tokens, mask: `[batch, P + n]` (left-padded prompt, then response).
    prompt_len: P.
    temperature: logits are divided by it, as the sampler does.

  Returns:
    dict with, per head: 'logits' `[batch, n, vocab]` (already / temperature) and
    'logprobs' `[batch, n]` float32 of the response tokens; 'values' `[batch, n]`.
  """
  positions = common.positions_from_mask(mask)
  outputs, _ = model.apply({"params": params}, tokens, positions, mask)
  out = {}
  if "logits" in outputs:
    logits = outputs["logits"][:, prompt_len - 1:] / temperature
    out["logits"] = logits[:, :-1]
    out["logprobs"] = sft_objective.token_logprobs(logits, tokens[:, prompt_len - 1:])
  if "scalar" in outputs:
    out["values"] = outputs["scalar"][:, prompt_len - 1:-1]
  return out


# ------------------------------------------------------------------------ rewards

def _report_bad_scores(scores, name: str) -> None:
  """Host-side check run every iteration; never raises (an exception in a callback of a
  multi-device program deadlocks its collectives): it logs, and the NaN reaches the loss."""
  scores = np.asarray(scores)
  bad = ~np.isfinite(scores)
  if bad.any():
    message = (f"reward {name!r} returned non-finite scores for {int(bad.sum())} of "
               f"{scores.size} responses (rows {np.flatnonzero(bad)[:8].tolist()}, values "
               f"{scores[bad][:4].tolist()}); the loss is made NaN and the run stops")
    logging.error(message)
    print(f"ERROR: {message}", file=sys.stderr, flush=True)


def checked_scores(scores, batch: int, name: str) -> jax.Array:
  """Checks a reward function's output: static shape now, finiteness on the host each step."""
  if getattr(scores, "shape", None) != (batch,):
    raise ValueError(f"reward {name!r} returned shape {getattr(scores, 'shape', None)}, "
                     f"expected [batch] = ({batch},) (config.ppo.reward)")
  scores = scores.astype(jnp.float32)
  jax.debug.callback(_report_bad_scores, replicated(scores), name)
  return scores


def replicated(x: jax.Array) -> jax.Array:
  """`x` gathered whole onto every device (inside a mesh), as a host callback needs it."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


def model_reward_fn(model, pooling: str = "last") -> RewardFn:
  """The learned reward model, in-graph (`reward.score`)."""
  def reward_fn(extras, sample):
    return reward_lib.score(model, extras["reward"], sample.tokens, sample.mask, pooling)
  return reward_fn


def decode_texts(tokenizer, tokens, mask) -> list[str]:
  """Decoded `[batch, seq]` sequences, masked-out tokens dropped."""
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  return [tokenizer.decode(t[m != 0]) for t, m in zip(tokens, mask)]


def _gold_scores_on_host(tokenizer, tokens, mask) -> np.ndarray:
  texts = decode_texts(tokenizer, tokens, mask)
  try:
    scores = np.asarray(gold_reward.gold_reward(texts), np.float32)
  except Exception as e:  # pylint: disable=broad-except
    scores, problem = None, f"raised {type(e).__name__}: {e}"
  else:
    problem = None if scores.shape == (len(texts),) else (
        f"returned shape {scores.shape}, expected ({len(texts)},)")
  if problem:
    # Never raise inside a callback (see _report_bad_scores): NaN stops the run.
    message = f"reward 'gold' (testbed.gold_reward.gold_reward) {problem}"
    logging.error(message)
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    return np.full((len(texts),), np.nan, np.float32)
  return scores


def gold_reward_fn(tokenizer) -> RewardFn:
  """The testbed's gold reward (VADER) of prompt + response, through `jax.pure_callback`."""
  def reward_fn(extras, sample):
    del extras
    tokens, mask = replicated(sample.tokens), replicated(sample.mask)
    return jax.pure_callback(
        lambda t, m: _gold_scores_on_host(tokenizer, t, m),
        jax.ShapeDtypeStruct(tokens.shape[:1], jnp.float32), tokens, mask)
  return reward_fn


def check_gold_reward() -> None:
  """Fails fast, in the main thread, if the gold reward is not texts -> finite [batch]."""
  probe = ["The film is great.", "The film is awful."]
  scores = np.asarray(gold_reward.gold_reward(probe))
  if scores.shape != (2,) or not np.all(np.isfinite(scores)):
    raise ValueError(f"reward 'gold': testbed.gold_reward.gold_reward on {len(probe)} probe "
                     f"texts returned shape {scores.shape} {scores.ravel()[:4].tolist()}; "
                     f"expected {len(probe)} finite scores")


def make_reward_fn(config: ml_collections.ConfigDict, models: Models) -> RewardFn:
  if config.ppo.reward == "model":
    return model_reward_fn(models.reward, models.reward_pooling)
  check_gold_reward()
  return gold_reward_fn(tokenizers.make_tokenizer(config.tokenizer))


# ------------------------------------------------------------------------ rollout

def rollout(config: ml_collections.ConfigDict, models: Models, reward_fn: RewardFn, params,
            extras, prompt_tokens, prompt_mask, rng) -> dict:
  """Samples one response per prompt row and scores it; no gradients.

  Args:
    params: {'policy': ..., ['critic': ...]}; extras: {'reference', ['reward'], ...}.
    prompt_tokens, prompt_mask: `[batch, P]` left-padded (already repeated per sample).

  Returns:
    dict of `[batch, P + n]` tokens/mask, `[batch, n]` response_tokens/response_mask,
    logprobs (recomputed by a full forward pass), sampler_logprobs, ref_logprobs,
    values (when there is a critic), `[batch]` scores (the reward function's), and
    contains_eos.
  """
  pc = config.ppo
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  p = prompt_tokens.shape[1]
  sample = sampling.sample(params["policy"], models.policy, prompt_tokens, prompt_mask, rng,
                           max_new_tokens=pc.max_new_tokens, temperature=pc.temperature,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  sample = jax.tree.map(jax.lax.stop_gradient, sample)
  forward = lambda model, prm: response_outputs(model, prm, sample.tokens, sample.mask, p,
                                                pc.temperature)
  policy_out = forward(models.policy, params["policy"])
  out = {
      "tokens": sample.tokens, "mask": sample.mask,
      "response_tokens": sample.response_tokens, "response_mask": sample.response_mask,
      "sampler_logprobs": sample.logprobs,
      "logprobs": policy_out["logprobs"],
      "ref_logprobs": forward(models.reference, extras["reference"])["logprobs"],
  }
  if models.critic is not None:
    out["values"] = forward(models.critic, params["critic"])["values"]
  elif "values" in policy_out:
    out["values"] = policy_out["values"]
  out["scores"] = checked_scores(reward_fn(extras, sample), prompt_tokens.shape[0], pc.reward)
  is_eos = (sample.response_tokens == tokenizer.eos_id) & (sample.response_mask != 0)
  out["contains_eos"] = jnp.any(is_eos, axis=1)
  return jax.tree.map(jax.lax.stop_gradient, out)


# ------------------------------------------------------------------------ evaluation

@functools.cache
def _sample_fn(policy, reference, reward, pooling: str, max_new_tokens: int, eos_id: int,
               pad_id: int):
  @jax.jit
  def fn(policy_params, reference_params, reward_params, batch, rng):
    sample = sampling.sample(policy_params, policy, batch["prompt_tokens"], batch["prompt_mask"],
                             rng, max_new_tokens=max_new_tokens, temperature=1.0, eos_id=eos_id,
                             pad_id=pad_id)
    p = batch["prompt_tokens"].shape[1]
    ref = response_outputs(reference, reference_params, sample.tokens, sample.mask, p)["logprobs"]
    out = {"tokens": sample.tokens, "mask": sample.mask, "response_mask": sample.response_mask,
           "logprobs": sample.logprobs, "ref_logprobs": ref}
    if reward is not None:
      out["rm_score"] = reward_lib.score(reward, reward_params, sample.tokens, sample.mask, pooling)
    return out
  return fn


def sampled_policy_metrics(policy, policy_params, reference, reference_params, prompt_batches,
                           mesh, rng, *, tokenizer, max_new_tokens: int, num_texts: int,
                           reward=None, reward_params=None, pooling: str = "last") -> dict:
  """One response (temperature 1) per held-out prompt: gold reward (mean, std, stderr),
  MC sequence KL(pi || pi_ref) with its standard error, response length, distinct-n,
  the fraction ending in EOS, the learned reward (`rm_score`, when `reward` is given),
  and `samples`: the first `num_texts` texts (prompt + response) with their gold.

  prompt_batches: host batches of left-padded `prompt_tokens`, `prompt_mask` `[batch, P]`
  and `valid` `[batch]`.
  """
  fn = _sample_fn(policy, reference, reward, pooling, max_new_tokens, tokenizer.eos_id,
                  tokenizer.pad_id)
  columns, p = {}, None
  for i, batch in enumerate(prompt_batches):
    p = batch["prompt_tokens"].shape[1]
    batch = sharding_lib.put_batch(batch, mesh)   # multi-host: gather outputs and rows alike
    out, valid = sharding_lib.to_host((fn(policy_params, reference_params, reward_params, batch,
                                          jax.random.fold_in(rng, i)), batch["valid"]))
    valid = np.asarray(valid) == 1
    for k, v in out.items():
      columns.setdefault(k, []).append(np.asarray(v)[valid])
  if not columns:
    raise ValueError("sampled evaluation: the eval split gave no prompt batches")
  c = {k: np.concatenate(v) for k, v in columns.items()}
  texts = decode_texts(tokenizer, c["tokens"], c["mask"])
  responses = decode_texts(tokenizer, c["tokens"][:, p:], c["mask"][:, p:])
  gold = gold_reward.gold_reward(texts)
  kl = evaluation.sequence_kl_estimate(c["logprobs"], c["ref_logprobs"], c["response_mask"])
  summary = evaluation.summarize_policy(responses, gold, c["response_mask"].sum(axis=1), kl=kl,
                                        num_samples=0)
  summary.update(
      samples=[f"{t}  [gold {g:+.2f}]" for t, g in zip(texts[:num_texts], gold[:num_texts])],
      eos_fraction=float(np.mean(np.any((c["tokens"][:, p:] == tokenizer.eos_id)
                                        & (c["mask"][:, p:] != 0), axis=1))))
  if "rm_score" in c:
    summary["rm_score"] = float(np.mean(c["rm_score"]))
  return summary
