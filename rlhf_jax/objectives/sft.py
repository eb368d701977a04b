"""Token log-probabilities and the supervised fine-tuning loss.

Convention (ARCHITECTURE.md, LM batch): position `t` predicts `tokens[t+1]`, and the loss
at target `t+1` is weighted by `loss_mask[t+1]`, so every output here has `T - 1` steps.
"""

import jax
import jax.numpy as jnp


def _float(x):
  """Upcasts to at least float32 (bf16 -> f32; f64 stays f64 for gradient checks)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def weighted_mean(x, weights=None):
  """Mean of `x` `[batch]`; with `weights` `[batch]` the weighted mean (0 drops a row), as
  the losses of every objective average over examples (an eval batch passes `valid`)."""
  if weights is None:
    return jnp.mean(x)
  weights = _float(weights)
  return jnp.sum(weights * x) / jnp.maximum(jnp.sum(weights), 1e-8)


def token_logprobs(logits, tokens):
  """log p(tokens[:, t+1] | tokens[:, :t+1]), computed in float32.

  Args:
    logits: `[batch, seq, vocab]` model outputs.
    tokens: `[batch, seq]` int token ids.

  Returns:
    `[batch, seq - 1]` log-probabilities of `tokens[:, 1:]` under `logits[:, :-1]`.
  """
  logits = _float(logits[:, :-1])
  targets = jnp.asarray(tokens)[:, 1:]
  # Shift by the max before gathering: logit - logsumexp of unshifted large logits cancels
  # catastrophically in float32.
  logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logits - jnp.log(jnp.sum(jnp.exp(logits), axis=-1))


def token_entropy(logits):
  """Entropy -sum_v p log p of the softmax over the last axis: `[..., vocab]` -> `[...]`."""
  logp = jax.nn.log_softmax(_float(logits), axis=-1)
  p = jnp.exp(logp)
  return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)  # 0 log 0 = 0 for -inf logits


def sequence_logprobs(logits, tokens, loss_mask):
  """Summed log-prob of the target tokens of each sequence, log pi(y | x).

  Args:
    logits: `[batch, seq, vocab]`.
    tokens: `[batch, seq]`.
    loss_mask: `[batch, seq]`, 1 where `tokens[t]` is a target.

  Returns:
    `[batch]` sum over t of `token_logprobs[:, t] * loss_mask[:, t + 1]`.
  """
  weights = _float(loss_mask)[:, 1:]
  return jnp.sum(token_logprobs(logits, tokens) * weights, axis=-1)


def sft_loss(logits, tokens, loss_mask):
  """Mean next-token negative log-likelihood over all target tokens of the batch.

  Token-level mean: every target token of the batch counts equally, so long responses
  weigh more than short ones (the usual SFT / pretraining convention).

  Args:
    logits: `[batch, seq, vocab]`.
    tokens: `[batch, seq]`.
    loss_mask: `[batch, seq]`, 1 where `tokens[t]` is a target.

  Returns:
    `(loss, metrics)`: scalar float32 loss; metrics `loss`, `num_target_tokens`,
    `accuracy` (argmax prediction == target, over target tokens).
  """
  weights = _float(loss_mask)[:, 1:]
  num_tokens = jnp.sum(weights)
  denom = jnp.maximum(num_tokens, 1.0)
  nll = -token_logprobs(logits, tokens)
  loss = jnp.sum(nll * weights) / denom
  correct = jnp.argmax(logits[:, :-1], axis=-1) == jnp.asarray(tokens)[:, 1:]
  accuracy = jnp.sum(correct * weights) / denom
  return loss, {'loss': loss, 'num_target_tokens': num_tokens, 'accuracy': accuracy}
