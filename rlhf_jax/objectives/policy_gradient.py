"""Policy-gradient pieces for RLHF: KL-shaped rewards, GAE, PPO, RLOO and GRPO.

Per-token arrays are `[batch, num_response_tokens]` aligned with `response_mask` (1 on real
response tokens, right-padded). Masked positions may hold garbage: they are selected away with
`jnp.where` (not multiplied by 0), so they get exactly zero value and zero gradient.
"""

import jax
import jax.numpy as jnp

from rlhf_jax.objectives import sft


def _float(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked(x, mask):
  """`x` as float with masked-out entries replaced by 0 (values and gradients)."""
  return jnp.where(mask, _float(x), 0.0)


def masked_mean(x, mask, axis=None):
  """Mean of `x` over entries where `mask` is 1 (0 when there are none)."""
  mask = _float(mask) > 0
  total = jnp.sum(_masked(x, mask), axis=axis)
  return total / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def sequence_sum(x, mask):
  """`[batch, n]` -> `[batch]`: the sum over each row's masked entries."""
  return jnp.sum(jnp.where(mask != 0, x, 0.0), axis=1)


def whiten(x, mask, shift_mean=True):
  """Masked whitening: mean 0 and std 1 over the masked entries.

  The variance is the population variance (divided by the count of masked entries);
  TRL's and Tunix's whitening use the sample variance (count - 1), which differs by a
  factor (count - 1) / count, negligible for a rollout of many tokens. With
  `shift_mean=False` the mean is added back (only the scale changes). Entries outside
  the mask are returned as 0.
  """
  m = _float(mask) > 0
  x = _masked(x, m)
  mean = masked_mean(x, m)
  var = masked_mean(jnp.square(x - mean), m)
  out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
  if not shift_mean:
    out = out + mean
  return jnp.where(m, out, 0.0)


def kl_penalty(logprobs, ref_logprobs, kind='k1'):
  """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating
  KL Divergence"), with r = pi_ref / pi = exp(ref_logprobs - logprobs):

  'k1': -log r = logprobs - ref_logprobs (unbiased, can be negative);
  'k3': (r - 1) - log r (unbiased, >= 0);  'mse': 0.5 (log r)^2 (k2);  'abs': |log r|.
  Shapes: any, `logprobs` and `ref_logprobs` alike.
  """
  log_r = _float(ref_logprobs) - _float(logprobs)
  if kind == 'k1':
    return -log_r
  if kind == 'k3':
    return jnp.expm1(log_r) - log_r
  if kind == 'mse':
    return 0.5 * jnp.square(log_r)
  if kind == 'abs':
    return jnp.abs(log_r)
  raise ValueError(f"kl_penalty: unknown kind {kind!r}; expected 'k1', 'k3', 'mse' or 'abs'")


def shaped_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef, kl_kind='k1'):
  """Per-token RLHF rewards (Ziegler et al. 2019, Sec. 2; Huang et al. 2024, "The N+
  implementation details of RLHF with PPO"): -kl_coef * KL_t at every response token, plus
  the sequence score at the last unmasked response token.

  Args:
    scores: `[batch]` reward-model scores.
    logprobs, ref_logprobs: `[batch, n]` log-probs of the response tokens.
    response_mask: `[batch, n]`.
    kl_coef: KL coefficient beta.
    kl_kind: estimator, see `kl_penalty`.

  Returns:
    `[batch, n]` rewards, 0 at masked positions (an empty response gets no score).
  """
  m = _float(response_mask) > 0
  n = m.shape[1]
  last = n - 1 - jnp.argmax(m[:, ::-1], axis=1)
  at_last = jax.nn.one_hot(last, n, dtype=bool) & m
  rewards = -kl_coef * kl_penalty(logprobs, ref_logprobs, kl_kind)
  rewards = rewards + jnp.where(at_last, _float(scores)[:, None], 0.0)
  return jnp.where(m, rewards, 0.0)


def gae(rewards, values, response_mask, gamma=1.0, lam=0.95):
  """Generalised advantage estimation (Schulman et al. 2016, eq. 16).

  A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after
  the last response token. Computed by a reverse `lax.scan` over time; masked positions are
  skipped (they pass the running value and advantage through unchanged).

  Args:
    rewards, values: `[batch, n]`.
    response_mask: `[batch, n]`.

  Returns:
    `(advantages, returns)`, both `[batch, n]`, returns = advantages + values, 0 where masked.
  """
  m = _float(response_mask) > 0
  rewards, values = _masked(rewards, m), _masked(values, m)

  def step(carry, inputs):
    next_value, next_adv = carry
    r, v, mt = inputs
    adv = r + gamma * next_value - v + gamma * lam * next_adv
    carry = (jnp.where(mt, v, next_value), jnp.where(mt, adv, next_adv))
    return carry, jnp.where(mt, adv, 0.0)

  zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
  _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, m.T), reverse=True)
  adv = adv.T
  return adv, jnp.where(m, adv + values, 0.0)


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2):
  """PPO clipped surrogate (Schulman et al. 2017, eq. 7), negated, token-level masked mean.

  loss = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)), rho_t = pi / pi_old.
  `old_logprobs` and `advantages` are constants (stop_gradient).

  Args:
    logprobs, old_logprobs, advantages, mask: `[batch, n]`.

  Returns:
    `(loss, metrics)`: `clipfrac` (fraction of tokens where the clipped term is active),
    `approx_kl` (k3 estimate (rho - 1) - log rho of KL(pi_old || pi)), `ratio` (mean rho).
  """
  m = _float(mask) > 0
  adv = jax.lax.stop_gradient(_masked(advantages, m))
  log_ratio = _masked(logprobs, m) - jax.lax.stop_gradient(_masked(old_logprobs, m))
  ratio = jnp.exp(log_ratio)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), m)
  metrics = {
      'loss': loss,
      'clipfrac': masked_mean(clipped > unclipped, m),
      'approx_kl': masked_mean(jnp.expm1(log_ratio) - log_ratio, m),
      'ratio': masked_mean(ratio, m),
  }
  return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2):
  """Clipped value loss 0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2), masked
  token mean (Huang et al. 2024, detail "value function clipping"; OpenAI baselines ppo2).

  Args:
    values, old_values, returns, mask: `[batch, n]`.

  Returns:
    `(loss, metrics)`: `clipfrac` (fraction where the clipped term is larger).
  """
  m = _float(mask) > 0
  v = _masked(values, m)
  old = jax.lax.stop_gradient(_masked(old_values, m))
  ret = jax.lax.stop_gradient(_masked(returns, m))
  v_clipped = old + jnp.clip(v - old, -clip_eps, clip_eps)
  err, err_clipped = jnp.square(v - ret), jnp.square(v_clipped - ret)
  loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), m)
  return loss, {'loss': loss, 'clipfrac': masked_mean(err_clipped > err, m)}


def entropy_from_logits(logits, mask):
  """Masked mean entropy of the per-token distributions: logits `[batch, n, vocab]`."""
  return masked_mean(sft.token_entropy(logits), mask)


def adaptive_kl_update(kl_coef, measured_kl, n_steps, target, horizon):
  """Adaptive KL controller (Ziegler et al. 2019, eq. 2) as a pure function.

  e = clip(KL / target - 1, -0.2, 0.2); beta <- beta (1 + e n_steps / horizon).
  """
  e = jnp.clip(measured_kl / target - 1.0, -0.2, 0.2)
  return kl_coef * (1.0 + e * n_steps / horizon)


def _grouped(scores, k, name):
  scores = _float(scores)
  if k < 2 or scores.ndim != 1 or scores.shape[0] % k:
    raise ValueError(f'{name}: scores of shape {scores.shape} must be [num_prompts * k] '
                     f'with k >= 2 (got k={k})')
  return scores.reshape(-1, k)


def rloo_advantages(scores, k):
  """REINFORCE leave-one-out baseline (Ahmadian et al. 2024, eq. 4): r_i - mean_{j != i} r_j.

  Args:
    scores: `[num_prompts * k]`, the k samples of a prompt contiguous.
    k: samples per prompt (>= 2).

  Returns:
    `[num_prompts * k]` advantages, summing to 0 within each group.
  """
  s = _grouped(scores, k, 'rloo_advantages')
  others_mean = (jnp.sum(s, axis=1, keepdims=True) - s) / (k - 1)
  return (s - others_mean).reshape(-1)


def grpo_advantages(scores, k, eps=1e-4):
  """GRPO outcome-supervision advantages (Shao et al. 2024, Sec. 4.1.2):
  (r_i - mean(r)) / (std(r) + eps) within each group of k, std with Bessel's correction
  (as TRL, OpenRLHF and verl compute it). `[num_prompts * k]` -> `[num_prompts * k]`.
  """
  s = _grouped(scores, k, 'grpo_advantages')
  mean = jnp.mean(s, axis=1, keepdims=True)
  std = jnp.std(s, axis=1, keepdims=True, ddof=1)
  return ((s - mean) / (std + eps)).reshape(-1)


def grpo_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps=0.2,
              kl_coef=0.04):
  """GRPO objective (Shao et al. 2024, eq. 3), negated, with the KL estimator of eq. 4.

  loss = mean_i 1/|o_i| sum_t -[min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - kl_coef KL_t],
  KL_t = pi_ref/pi - log(pi_ref/pi) - 1. Per-sequence length mean, then batch mean over
  all rows: a row with an empty response contributes 0 and still counts in the mean.

  Args:
    logprobs, old_logprobs, ref_logprobs, mask: `[batch, n]`.
    advantages: `[batch]`, one per sequence, broadcast over its tokens.

  Returns:
    `(loss, metrics)`: `kl` (token mean of KL_t), `clipfrac`, `ratio`.
  """
  m = _float(mask) > 0
  logp = _masked(logprobs, m)
  adv = jax.lax.stop_gradient(_float(advantages))[:, None]
  log_ratio = logp - jax.lax.stop_gradient(_masked(old_logprobs, m))
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
  kl = kl_penalty(logp, _masked(ref_logprobs, m), 'k3')
  per_token = -(jnp.minimum(unclipped, clipped) - kl_coef * kl)
  loss = jnp.mean(masked_mean(per_token, m, axis=1))
  metrics = {
      'loss': loss,
      'kl': masked_mean(kl, m),
      'clipfrac': masked_mean(clipped < unclipped, m),
      'ratio': masked_mean(ratio, m),
  }
  return loss, metrics
