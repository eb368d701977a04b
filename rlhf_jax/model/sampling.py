"""Autoregressive sampling: prefill a left-padded prompt into a KV cache, then
decode one token a step in a `lax.while_loop` that stops once every sequence has
emitted EOS. Temperature, top-k, top-p (nucleus) and greedy decoding."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.model import transformer

# Logit given to filtered-out tokens; finite, and far below any Gumbel-perturbed logit.
_FILTERED = -1e30


class SampleOutput(NamedTuple):
  tokens: jax.Array           # [B, P+N] prompt then response
  mask: jax.Array             # [B, P+N] 1 on real prompt tokens and unmasked response tokens
  response_tokens: jax.Array  # [B, N] pad after EOS
  response_mask: jax.Array    # [B, N] 1 up to and including EOS
  logprobs: jax.Array         # [B, N] float32 log_softmax(logits / T)[token]; 0 where masked


def prompt_positions(mask):
  """Positions of a left-padded sequence: cumsum(mask) - 1, clipped at 0. [B, T] int32."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def filter_logits(logits, top_k=0, top_p=1.0):
  """Sets logits outside the top-k and outside the top-p nucleus to a large negative.

  logits: [B, V] float32, already divided by the temperature. Tokens tied with the
  k-th largest logit are kept. The nucleus is the smallest set of most probable
  tokens whose probability reaches `top_p` (always at least the top token).
  """
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, _FILTERED, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p                                   # a prefix; keep[:, 0] is True
    num_keep = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, num_keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, _FILTERED, logits)
  return logits


def _choose(logits, rng, temperature, top_k, top_p, greedy):
  """Picks one token per row. Returns (token [B] int32, logprob [B] float32)."""
  logits = logits.astype(jnp.float32)
  if greedy:
    token = jnp.argmax(logits, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
  else:
    scaled = logits / temperature
    logp = jax.nn.log_softmax(scaled, axis=-1)
    token = jax.random.categorical(rng, filter_logits(scaled, top_k, top_p), axis=-1)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p", "greedy", "eos_id",
    "pad_id"))
def sample(params, model, prompt_tokens, prompt_mask, rng, *, max_new_tokens,
           temperature=1.0, top_k=0, top_p=1.0, greedy=False, eos_id, pad_id):
  """Samples `max_new_tokens` tokens after left-padded prompts.

  Args:
    params: the model's params (boxed or not).
    model: a `Transformer` with 'lm' in its heads.
    prompt_tokens, prompt_mask: [B, P] int32, left-padded.
    rng: PRNG key; the samples are a function of it.
    max_new_tokens: N. temperature: > 0, ignored when greedy.
    top_k: keep the k most likely tokens (0: all). top_p: nucleus mass (1: all).
    eos_id, pad_id: a sequence stops after EOS; later tokens are pad, masked. An
      eos_id outside the vocabulary (e.g. -1) never stops a sequence.
  Returns:
    SampleOutput; `logprobs` use the unfiltered log_softmax(logits / temperature)
    (temperature 1 when greedy), matching what a training step computes.
  """
  config = model.config
  b, p = prompt_tokens.shape
  n = max_new_tokens
  if "lm" not in model.heads:
    raise ValueError(f"sample: the model needs the 'lm' head, has {model.heads}")
  if n < 1:
    raise ValueError(f"sample: max_new_tokens must be >= 1, got {n}")
  if p + n > config.max_len:
    raise ValueError(f"sample: prompt length {p} + max_new_tokens {n} exceeds "
                     f"config.model.max_len={config.max_len}")
  if prompt_mask.shape != (b, p):
    raise ValueError(f"sample: prompt_mask {prompt_mask.shape} != prompt_tokens {(b, p)}")
  if not greedy and not temperature > 0:
    raise ValueError(f"sample: temperature must be > 0, got {temperature}")
  if top_k < 0 or top_k > config.vocab_size:
    raise ValueError(f"sample: top_k must be in [0, {config.vocab_size}], got {top_k}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
  params = {"params": params}
  choose = functools.partial(_choose, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy)

  prompt_tokens = prompt_tokens.astype(jnp.int32)
  prompt_mask = prompt_mask.astype(jnp.int32)
  # Generated slots are always visible; what follows EOS is never read back.
  key_mask = jnp.concatenate([prompt_mask, jnp.ones((b, n), jnp.int32)], axis=1)
  cache = transformer.init_cache(config, b, p + n)
  outputs, cache = model.apply(params, prompt_tokens, prompt_positions(prompt_mask),
                               key_mask, cache)
  next_pos = jnp.sum(prompt_mask, axis=1)                        # [B] position of token 0

  def emit(i, logits, done, buffers):
    tokens, mask, logprobs = buffers
    token, logp = choose(logits[:, -1], jax.random.fold_in(rng, i))
    token = jnp.where(done, pad_id, token)
    buffers = (tokens.at[:, i].set(token),
               mask.at[:, i].set(jnp.where(done, 0, 1)),
               logprobs.at[:, i].set(jnp.where(done, 0.0, logp)))
    return done | (token == eos_id), buffers

  buffers = (jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b, n), jnp.int32),
             jnp.zeros((b, n), jnp.float32))
  done, buffers = emit(0, outputs["logits"], jnp.zeros((b,), bool), buffers)

  def cond(carry):
    i, _, done, _ = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, cache, done, buffers = carry
    last = jax.lax.dynamic_slice_in_dim(buffers[0], i - 1, 1, axis=1)   # [B, 1]
    outputs, cache = model.apply(params, last, (next_pos + i - 1)[:, None], key_mask, cache)
    done, buffers = emit(i, outputs["logits"], done, buffers)
    return i + 1, cache, done, buffers

  _, _, _, (tokens, mask, logprobs) = jax.lax.while_loop(
      cond, body, (jnp.ones((), jnp.int32), cache, done, buffers))
  return SampleOutput(
      tokens=jnp.concatenate([prompt_tokens, tokens], axis=1),
      mask=jnp.concatenate([prompt_mask, mask], axis=1),
      response_tokens=tokens, response_mask=mask, logprobs=logprobs)


def make_sampler(model, **options):
  """`sample` with the model and options bound: fn(params, prompt_tokens, prompt_mask, rng)."""
  def sampler(params, prompt_tokens, prompt_mask, rng):
    return sample(params, model, prompt_tokens, prompt_mask, rng, **options)
  return sampler
