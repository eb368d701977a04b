"""One batched rollout: sample responses, then score every response token.

A rollout samples responses to left-padded prompts with the KV-cache sampler, then
scores every response token in one full forward pass per model: log-probs of the
policy and of the frozen reference, values of the critic, and a sequence score from a
reward function (`rl.rewards`). Everything is jittable, so the whole RL iteration stays
one pure function.

Per-token arrays are `[batch, n]`, n = config.sampling.max_new_tokens, aligned with
`response_mask`. Token `t` of the response is predicted from position `P - 1 + t` of the
sequence `[prompt (P, left-padded), response (n)]`; the value of that state is read at
the same position (Huang et al. 2024, "The N+ implementation details of RLHF with PPO":
values and log-probs both come from `[:, P - 1 : -1]`).
"""

import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import tokenizers
from rlhf_jax.model import sampling
from rlhf_jax.objectives import sft as sft_objective
from rlhf_jax.rl import rewards
from rlhf_jax.stages import common


def rollout_batch_size(config: ml_collections.ConfigDict) -> int:
  """Responses per iteration: prompts per batch x samples per prompt."""
  return config.data.batch_size * config.rl.samples_per_prompt


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


def rollout(config: ml_collections.ConfigDict, models, reward_fn: rewards.RewardFn, params,
            extras, prompt_tokens, prompt_mask, rng) -> dict:
  """Samples one response per prompt row and scores it; no gradients.

  Args:
    models: `rl.models.Models`.
    params: {'policy': ..., ['critic': ...]}; extras: {'reference', ['reward'], ...}.
    prompt_tokens, prompt_mask: `[batch, P]` left-padded (already repeated per sample).

  Returns:
    dict of `[batch, P + n]` tokens/mask, `[batch, n]` response_tokens/response_mask,
    logprobs (recomputed by a full forward pass), sampler_logprobs, ref_logprobs,
    values (when there is a critic), `[batch]` scores (the reward function's), and
    contains_eos.
  """
  temperature = config.sampling.temperature
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  p = prompt_tokens.shape[1]
  sample = sampling.sample(params["policy"], models.policy, prompt_tokens, prompt_mask, rng,
                           max_new_tokens=config.sampling.max_new_tokens,
                           temperature=temperature, eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id)
  sample = jax.tree.map(jax.lax.stop_gradient, sample)
  forward = lambda model, prm: response_outputs(model, prm, sample.tokens, sample.mask, p,
                                                temperature)
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
  out["scores"] = rewards.checked_scores(reward_fn(extras, sample), prompt_tokens.shape[0],
                                         config.rl.reward)
  is_eos = (sample.response_tokens == tokenizer.eos_id) & (sample.response_mask != 0)
  out["contains_eos"] = jnp.any(is_eos, axis=1)
  return jax.tree.map(jax.lax.stop_gradient, out)
