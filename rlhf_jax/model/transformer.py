"""Decoder-only transformer: Llama family (RMSNorm, RoPE, SwiGLU, GQA, optional
QKV bias as in Qwen2) and GPT-2 (LayerNorm, learned positions, GELU, biases) as
options of one Flax Linen module, with an explicit KV cache.

Parameter tree (trunk names never depend on `heads`):
  embed/embedding                 [vocab, embed]
  pos_embed/embedding             [max_len, embed]          (position == "learned")
  layer_{i}/attn_norm/{scale,bias}
  layer_{i}/attn/{query,key,value}/{kernel,bias}  [embed, (kv_)heads, head_dim]
  layer_{i}/attn/out/{kernel,bias}                [heads, head_dim, embed]
  layer_{i}/mlp_norm/{scale,bias}
  layer_{i}/mlp/{gate,up,down}/...   (swiglu)  or  layer_{i}/mlp/{fc,proj}/...  (gelu)
  final_norm/{scale,bias}
  lm_head/kernel                  [embed, vocab]            (untied, 'lm' head)
  scalar_head/{kernel,bias}       [embed, 1]                ('scalar' head)
"""

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

# Finite, so that a fully masked row softmaxes to a uniform (finite) distribution.
MASK_VALUE = -1e9

_CHOICES = {
    "norm": ("rms", "layer"),
    "position": ("rope", "learned"),
    "mlp": ("swiglu", "gelu"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16", "float16"),
    "remat": ("none", "full", "dots"),
}
_HEADS = ("lm", "scalar")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hashable model config; fields are those of `configs/base.py:model_config`."""
  vocab_size: int = 264
  embed_dim: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 32
  mlp_dim: int = 384
  max_len: int = 256
  norm: str = "rms"
  norm_eps: float = 1e-5
  position: str = "rope"
  rope_theta: float = 10000.0
  mlp: str = "swiglu"
  use_bias: bool = False
  qkv_bias: bool = False
  tie_embeddings: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"

  def __post_init__(self):
    def fail(key, msg):
      raise ValueError(f"config.model.{key}: {msg}")

    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.type is bool and not isinstance(v, bool):
        fail(f.name, f"expected a bool, got {v!r}")
      if f.type is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        fail(f.name, f"expected a positive int, got {v!r}")
      if f.type is float and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or v <= 0):
        fail(f.name, f"expected a positive float, got {v!r}")
      if f.name in _CHOICES and v not in _CHOICES[f.name]:
        fail(f.name, f"expected one of {_CHOICES[f.name]}, got {v!r}")
    if self.num_heads % self.num_kv_heads:
      fail("num_kv_heads", f"num_heads={self.num_heads} is not a multiple of "
           f"num_kv_heads={self.num_kv_heads}")
    if self.position == "rope" and self.head_dim % 2:
      fail("head_dim", f"rotary embeddings need an even head_dim, got {self.head_dim}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TransformerConfig":
    """Builds from a dict / ConfigDict holding exactly the dataclass fields."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in d:
      if key not in names:
        raise ValueError(f"config.model.{key}: unknown key (known: {', '.join(names)})")
    for key in names:
      if key not in d:
        raise ValueError(f"config.model.{key}: missing key")
    kwargs = {}
    for f in dataclasses.fields(cls):
      v = d[f.name]
      if f.type is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
      kwargs[f.name] = v
    return cls(**kwargs)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self):
    return jnp.dtype(self.param_dtype)


def num_params(config: TransformerConfig, heads=("lm",)) -> int:
  """Number of parameters `Transformer(config, heads).init` creates."""
  c = config
  d, b = c.embed_dim, c.use_bias
  norm = d * (2 if c.norm == "layer" else 1)
  qkv_b = b or c.qkv_bias
  attn = (d * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
          + qkv_b * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
          + c.num_heads * c.head_dim * d + b * d)
  if c.mlp == "swiglu":
    mlp = 3 * d * c.mlp_dim + b * (2 * c.mlp_dim + d)
  else:
    mlp = 2 * d * c.mlp_dim + b * (c.mlp_dim + d)
  n = c.vocab_size * d + c.num_layers * (2 * norm + attn + mlp) + norm
  if c.position == "learned":
    n += c.max_len * d
  if "lm" in heads and not c.tie_embeddings:
    n += d * c.vocab_size
  if "scalar" in heads:
    n += d + 1
  return int(n)


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token, 6N + 12 L H Dh T (PaLM, Chowdhery et al. 2022, App. B).

  N counts the parameters used in matmuls: all LM parameters minus the input
  embedding lookup table (kept when tied, as it is then the LM head matmul) and
  the learned position table.
  """
  c = config
  n = num_params(c, ("lm",))
  if not c.tie_embeddings:
    n -= c.vocab_size * c.embed_dim
  if c.position == "learned":
    n -= c.max_len * c.embed_dim
  return float(6 * n + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len)


def init_cache(config: TransformerConfig, batch: int, length: int, dtype=None):
  """Empty KV cache: `{'index': int32 [], 'layers': ({'k','v': [B, L, Hkv, Dh]}, ...)}`."""
  dtype = config.compute_dtype if dtype is None else dtype
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  layer = lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return {"index": jnp.zeros((), jnp.int32),
          "layers": tuple(layer() for _ in range(config.num_layers))}


def _init(names, stddev=0.02):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def apply_rope(x, positions, theta):
  """Rotary embedding, half-split layout as in HF Llama. x: [B, T, H, Dh]."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Norm(nn.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x32 = x.astype(jnp.float32)
    if c.norm == "layer":
      x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + c.norm_eps)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("embed",)),
                       (x.shape[-1],), c.weight_dtype)
    y = y * scale.astype(jnp.float32)
    if c.norm == "layer":
      bias = self.param("bias", _zeros(("embed",)), (x.shape[-1],), c.weight_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(c.compute_dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with an optional KV cache."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache, index):
    """x: [B, T, D]; mask: [B, T, S] bool; cache: None or {'k','v': [B, S, Hkv, Dh]}."""
    c = self.config
    h, kv, dh = c.num_heads, c.num_kv_heads, c.head_dim
    dense = lambda features, names, bias, name: nn.DenseGeneral(
        features, use_bias=bias, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
        kernel_init=_init(names), bias_init=_zeros(names[1:]), name=name)
    qkv_bias = c.use_bias or c.qkv_bias
    q = dense((h, dh), ("embed", "heads", "head_dim"), qkv_bias, "query")(x)
    k = dense((kv, dh), ("embed", "kv_heads", "head_dim"), qkv_bias, "key")(x)
    v = dense((kv, dh), ("embed", "kv_heads", "head_dim"), qkv_bias, "value")(x)
    if c.position == "rope":
      q = apply_rope(q, positions, c.rope_theta)
      k = apply_rope(k, positions, c.rope_theta)

    if cache is not None:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
      cache = {"k": k, "v": v}
      k, v = k.astype(c.compute_dtype), v.astype(c.compute_dtype)

    b, t = x.shape[:2]
    q = q.reshape(b, t, kv, h // kv, dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * dh ** -0.5
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(c.compute_dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)
    out = nn.DenseGeneral(
        c.embed_dim, axis=(-2, -1), use_bias=c.use_bias, dtype=c.compute_dtype,
        param_dtype=c.weight_dtype, name="out",
        kernel_init=_init(("heads", "head_dim", "embed"), 0.02 / (2 * c.num_layers) ** 0.5),
        bias_init=_zeros(("embed",)))(out)
    return out, cache


class Mlp(nn.Module):
  """SwiGLU (Llama) or GELU-tanh (GPT-2) MLP."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = lambda features, names, name, stddev=0.02: nn.Dense(
        features, use_bias=c.use_bias, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
        kernel_init=_init(names, stddev), bias_init=_zeros(names[1:]), name=name)
    out_std = 0.02 / (2 * c.num_layers) ** 0.5
    if c.mlp == "swiglu":
      hidden = (nn.silu(dense(c.mlp_dim, ("embed", "mlp"), "gate")(x))
                * dense(c.mlp_dim, ("embed", "mlp"), "up")(x))
      return dense(c.embed_dim, ("mlp", "embed"), "down", out_std)(hidden)
    hidden = nn.gelu(dense(c.mlp_dim, ("embed", "mlp"), "fc")(x), approximate=True)
    return dense(c.embed_dim, ("mlp", "embed"), "proj", out_std)(hidden)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache, index):
    h, cache = Attention(self.config, name="attn")(
        Norm(self.config, name="attn_norm")(x), positions, mask, cache, index)
    x = x + h
    x = x + Mlp(self.config, name="mlp")(Norm(self.config, name="mlp_norm")(x))
    return x, cache


class Transformer(nn.Module):
  """Decoder with an LM head ('lm') and/or a per-token scalar head ('scalar')."""
  config: TransformerConfig
  heads: tuple = ("lm",)

  @nn.compact
  def __call__(self, tokens, positions, key_mask, cache=None):
    """Returns (outputs, cache).

    tokens, positions: [B, T] int32. key_mask: [B, T] without a cache, or [B, L]
    covering the whole cache (1 where the key is a real token). With a cache, the
    T tokens are written at slots index..index+T-1 and the returned cache has
    index + T; the caller keeps index + T <= L (unchecked under jit, as are
    positions < max_len for learned positions).
    outputs: {'logits': [B, T, V] float32, 'scalar': [B, T] float32}.
    """
    c = self.config
    if not self.heads or any(hd not in _HEADS for hd in self.heads):
      raise ValueError(f"Transformer.heads: expected a non-empty subset of {_HEADS}, "
                       f"got {self.heads!r}")
    if tokens.ndim != 2 or positions.shape != tokens.shape:
      raise ValueError(f"Transformer: tokens {tokens.shape} and positions "
                       f"{positions.shape} must both be [batch, seq]")
    b, t = tokens.shape
    s = t if cache is None else cache["layers"][0]["k"].shape[1]
    if key_mask.shape != (b, s):
      raise ValueError(f"Transformer: key_mask has shape {key_mask.shape}, expected "
                       f"{(b, s)} ([batch, {'seq' if cache is None else 'cache_len'}])")
    if t > s:
      raise ValueError(f"Transformer: {t} tokens do not fit a cache of length {s}")
    if cache is not None and len(cache["layers"]) != c.num_layers:
      raise ValueError(f"Transformer: cache has {len(cache['layers'])} layers, "
                       f"config.model.num_layers is {c.num_layers}")

    index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    q_slot = index + jnp.arange(t)
    causal = jnp.arange(s)[None, :] <= q_slot[:, None]              # [T, S]
    mask = causal[None] & (key_mask[:, None, :] != 0)                 # [B, T, S]

    embed = nn.Embed(c.vocab_size, c.embed_dim, dtype=c.compute_dtype,
                     param_dtype=c.weight_dtype, embedding_init=_init(("vocab", "embed")),
                     name="embed")
    x = embed(tokens)
    if c.position == "learned":
      x = x + nn.Embed(c.max_len, c.embed_dim, dtype=c.compute_dtype,
                       param_dtype=c.weight_dtype, embedding_init=_init((None, "embed")),
                       name="pos_embed")(positions)

    block = Block
    if c.remat != "none":
      policy = (None if c.remat == "full"
                else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      block = nn.remat(Block, policy=policy)
    new_layers = []
    for i in range(c.num_layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x, layer_cache = block(c, name=f"layer_{i}")(x, positions, mask, layer_cache, index)
      new_layers.append(layer_cache)
    x = Norm(c, name="final_norm")(x)

    outputs = {}
    if "lm" in self.heads:
      if c.tie_embeddings:
        logits = embed.attend(x)
      else:
        logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                          param_dtype=c.weight_dtype, kernel_init=_init(("embed", "vocab")),
                          name="lm_head")(x)
      outputs["logits"] = logits.astype(jnp.float32)
    if "scalar" in self.heads:
      scalar = nn.Dense(1, dtype=jnp.float32, param_dtype=c.weight_dtype,
                        kernel_init=_init(("embed", None), c.embed_dim ** -0.5),
                        bias_init=_zeros((None,)), name="scalar_head")(x.astype(jnp.float32))
      outputs["scalar"] = scalar[..., 0]
    if cache is not None:
      cache = {"index": index + t, "layers": tuple(new_layers)}
    return outputs, cache


def init_params(model: Transformer, rng: jax.Array):
  """Fresh (logically boxed) params of `model`, traced on a `[1, 8]` dummy batch."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  return model.init(rng, tokens, tokens, jnp.ones((1, 8), jnp.int32))["params"]
