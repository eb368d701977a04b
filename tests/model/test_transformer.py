"""Transformer tests: a float64 NumPy reference forward, KV-cache decoding, masks,
heads, logical axes, dtypes, remat and config validation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from rlhf_jax.model import transformer as tr

LLAMA = tr.TransformerConfig(
    vocab_size=48, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    mlp_dim=64, max_len=32, qkv_bias=True, tie_embeddings=True, rope_theta=100.0)
GPT2 = tr.TransformerConfig(
    vocab_size=48, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
    mlp_dim=64, max_len=32, norm="layer", position="learned", mlp="gelu", use_bias=True,
    tie_embeddings=False)
CONFIGS = {"llama": LLAMA, "gpt2": GPT2}


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, *args):
  """Jitted `model.apply` (one compile per model and shapes)."""
  return model.apply({"params": params}, *args)


@functools.lru_cache(maxsize=None)
def random_params(config, heads=("lm",), seed=0):
  """(model, params) with every leaf random (biases and norm scales too), unboxed."""
  model = tr.Transformer(config, heads)
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens, tokens,
                                   tokens)["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape)
    name = path[-1].key
    value = 1 + 0.2 * noise if name == "scale" else (0.1 if name == "bias" else 0.3) * noise
    return jnp.asarray(value, leaf.dtype)

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def left_padded(rng, lengths, seq, vocab):
  """Random tokens, left-padded with token 0: (tokens, mask, positions) [B, seq]."""
  tokens = rng.integers(1, vocab, size=(len(lengths), seq))
  mask = (np.arange(seq)[None] >= seq - np.array(lengths)[:, None]).astype(np.int32)
  tokens = np.where(mask == 1, tokens, 0).astype(np.int32)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def np_forward(config, params, tokens, positions, mask):
  """Independent float64 forward. Returns (logits [B,T,V], final hidden [B,T,D])."""
  c = config
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)

  def norm(x, q):
    if c.norm == "layer":
      mu = x.mean(-1, keepdims=True)
      y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + c.norm_eps)
      return y * q["scale"] + q["bias"]
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + c.norm_eps) * q["scale"]

  def dense(x, q, spec):
    y = np.einsum(spec, x, q["kernel"])
    return y + q["bias"] if "bias" in q else y

  def rope(x):  # pairs (i, i + Dh/2) rotate as complex numbers by angle pos * theta^(-2i/Dh)
    half = c.head_dim // 2
    freq = c.rope_theta ** (-2.0 * np.arange(half) / c.head_dim)
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(
        1j * positions[:, :, None, None] * freq)
    return np.concatenate([z.real, z.imag], -1)

  b, t = tokens.shape
  x = p["embed"]["embedding"][tokens]
  if c.position == "learned":
    x = x + p["pos_embed"]["embedding"][positions]
  allowed = np.tril(np.ones((t, t), bool))[None] & (mask[:, None, :] == 1)
  group = c.num_heads // c.num_kv_heads
  for i in range(c.num_layers):
    lp = p[f"layer_{i}"]
    h = norm(x, lp["attn_norm"])
    q = dense(h, lp["attn"]["query"], "btd,dhk->bthk")
    k = dense(h, lp["attn"]["key"], "btd,dhk->bthk")
    v = dense(h, lp["attn"]["value"], "btd,dhk->bthk")
    if c.position == "rope":
      q, k = rope(q), rope(k)
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c.head_dim)
    s = np.where(allowed[:, None], s, -1e30)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, v)
    x = x + dense(o, lp["attn"]["out"], "bthk,hkd->btd")
    h = norm(x, lp["mlp_norm"])
    m = lp["mlp"]
    if c.mlp == "swiglu":
      g = dense(h, m["gate"], "btd,df->btf")
      h = g / (1 + np.exp(-g)) * dense(h, m["up"], "btd,df->btf")
      x = x + dense(h, m["down"], "btf,fd->btd")
    else:
      h = dense(h, m["fc"], "btd,df->btf")
      h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
      x = x + dense(h, m["proj"], "btf,fd->btd")
  x = norm(x, p["final_norm"])
  head = p["embed"]["embedding"].T if c.tie_embeddings else p["lm_head"]["kernel"]
  return x @ head, x


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_matches_numpy_reference(name):
  config = CONFIGS[name]
  model, params = random_params(config, ("lm", "scalar"))
  tokens, mask, positions = left_padded(np.random.default_rng(0), [7, 4, 1], 7,
                                        config.vocab_size)
  out, cache = forward(model, params, tokens, positions, mask)
  ref_logits, ref_hidden = np_forward(config, params, tokens, positions, mask)
  ref_scalar = ref_hidden @ np.asarray(params["scalar_head"]["kernel"], np.float64)[:, 0]
  ref_scalar += float(params["scalar_head"]["bias"][0])
  real = mask == 1
  assert cache is None
  assert out["logits"].dtype == jnp.float32 and out["logits"].shape == (3, 7, 48)
  assert out["scalar"].dtype == jnp.float32 and out["scalar"].shape == (3, 7)
  assert np.std(ref_logits[real]) > 0.5  # the check below is not vacuous
  np.testing.assert_allclose(out["logits"][real], ref_logits[real], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out["scalar"][real], ref_scalar[real], atol=2e-5, rtol=1e-5)
  assert np.all(np.isfinite(out["logits"]))  # padded (fully masked) rows too


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cache_decode_matches_full_forward(name):
  config = CONFIGS[name]
  model, params = random_params(config)
  p, n, spare = 5, 4, 3
  prompt, prompt_mask, _ = left_padded(np.random.default_rng(1), [5, 3, 1], p,
                                       config.vocab_size)
  new = np.random.default_rng(2).integers(1, config.vocab_size, (3, n)).astype(np.int32)
  tokens = np.concatenate([prompt, new], 1)
  mask = np.concatenate([prompt_mask, np.ones((3, n), np.int32)], 1)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  full, _ = forward(model, params, tokens, positions, mask)

  # Spare slots past the end are marked real: only causality may hide them.
  key_mask = np.concatenate([mask, np.ones((3, spare), np.int32)], 1)
  cache = tr.init_cache(config, 3, p + n + spare)
  logits = []
  for start, stop in [(0, p), (p, p + 1), (p + 1, p + n)]:  # prefill, 1 token, 3 tokens
    out, cache = forward(model, params, tokens[:, start:stop], positions[:, start:stop],
                         key_mask, cache)
    logits.append(out["logits"])
    assert int(cache["index"]) == stop
  logits = np.concatenate(logits, 1)
  real = mask == 1
  np.testing.assert_allclose(logits[real], full["logits"][real], atol=1e-5, rtol=1e-5)
  assert cache["layers"][0]["k"].shape == (3, p + n + spare, config.num_kv_heads,
                                           config.head_dim)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_causal_and_padding_invariant(name):
  config = CONFIGS[name]
  model, params = random_params(config)
  apply = lambda t, m, pos: forward(model, params, t, pos, m)[0]["logits"]
  tokens, mask, positions = left_padded(np.random.default_rng(3), [8, 8], 8,
                                        config.vocab_size)
  base_logits = apply(tokens, mask, positions)
  changed = tokens.copy()
  changed[:, 5] = (changed[:, 5] + 1) % config.vocab_size
  logits = apply(changed, mask, positions)
  np.testing.assert_array_equal(logits[:, :5], base_logits[:, :5])
  assert np.all(np.abs(logits[:, 5:] - base_logits[:, 5:]).max(-1) > 1e-3)

  # The same 8 tokens behind 3 pads (with different pad token ids) give the same logits.
  padded = np.concatenate([np.full((2, 3), 7, np.int32), tokens], 1)
  pmask = np.concatenate([np.zeros((2, 3), np.int32), mask], 1)
  ppos = np.maximum(np.cumsum(pmask, 1) - 1, 0)
  logits = apply(padded, pmask, ppos)
  np.testing.assert_allclose(logits[:, 3:], base_logits, atol=1e-5, rtol=1e-5)
  assert np.all(np.isfinite(logits))


def test_logical_axis_names_on_every_param():
  allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", None}
  tokens = jnp.zeros((1, 4), jnp.int32)
  for config in (LLAMA, GPT2):
    boxed = jax.eval_shape(tr.Transformer(config, ("lm", "scalar")).init,
                           jax.random.key(0), tokens, tokens, tokens)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) == len(jax.tree.leaves(nn.unbox(boxed)))
    for path, leaf in leaves:
      where = jax.tree_util.keystr(path)
      assert isinstance(leaf, nn.LogicallyPartitioned), where
      assert len(leaf.names) == leaf.value.ndim, where
      assert set(leaf.names) <= allowed, where
      assert any(leaf.names) or leaf.value.size == 1, where  # only the scalar head's bias
    specs = nn.get_partition_spec(boxed)
    assert specs["layer_0"]["attn"]["key"]["kernel"] == jax.sharding.PartitionSpec(
        "embed", "kv_heads", "head_dim")
    up = "up" if config.mlp == "swiglu" else "fc"
    down = "down" if config.mlp == "swiglu" else "proj"
    assert specs["layer_0"]["mlp"][up]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
    assert specs["layer_0"]["mlp"][down]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")
    assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_heads_share_trunk(name):
  config = CONFIGS[name]
  lm_model, lm_params = random_params(config, ("lm",))
  both_model, both_params = random_params(config, ("lm", "scalar"))
  scalar_model, scalar_params = random_params(config, ("scalar",))
  head_names = {"lm_head", "scalar_head"}
  trunk = lambda p: {k: v for k, v in p.items() if k not in head_names}
  shapes = lambda p: jax.tree.map(jnp.shape, trunk(p))
  assert shapes(lm_params) == shapes(both_params) == shapes(scalar_params)
  assert set(both_params) - set(lm_params) == {"scalar_head"}
  assert ("lm_head" in lm_params) == (not config.tie_embeddings)
  assert "lm_head" not in scalar_params

  # An LM checkpoint initialises the reward model by tree merge.
  merged = {**trunk(lm_params), "scalar_head": both_params["scalar_head"]}
  tokens, mask, positions = left_padded(np.random.default_rng(4), [6, 2], 6,
                                        config.vocab_size)
  out_lm, _ = forward(lm_model, lm_params, tokens, positions, mask)
  out_both, _ = forward(both_model, {**both_params, **lm_params}, tokens, positions, mask)
  out_scalar, _ = forward(scalar_model, merged, tokens, positions, mask)
  assert set(out_lm) == {"logits"} and set(out_scalar) == {"scalar"}
  np.testing.assert_array_equal(out_both["logits"], out_lm["logits"])
  np.testing.assert_array_equal(out_both["scalar"], out_scalar["scalar"])
  assert out_scalar["scalar"].shape == (2, 6)


def test_num_params_and_flops():
  tokens = jnp.zeros((1, 4), jnp.int32)
  for config in (LLAMA, GPT2):
    for heads in [("lm",), ("scalar",), ("lm", "scalar")]:
      params = jax.eval_shape(tr.Transformer(config, heads).init, jax.random.key(0), tokens,
                              tokens, tokens)
      count = sum(x.size for x in jax.tree.leaves(nn.unbox(params)))
      assert tr.num_params(config, heads) == count, (config, heads)
  # Published sizes: GPT-2 small 124,439,808; Llama-2-7B 6,738,415,616.
  gpt2 = tr.TransformerConfig(vocab_size=50257, embed_dim=768, num_layers=12, num_heads=12,
                              num_kv_heads=12, head_dim=64, mlp_dim=3072, max_len=1024,
                              norm="layer", position="learned", mlp="gelu", use_bias=True)
  llama = tr.TransformerConfig(vocab_size=32000, embed_dim=4096, num_layers=32,
                               num_heads=32, num_kv_heads=32, head_dim=128, mlp_dim=11008,
                               max_len=4096, tie_embeddings=False)
  assert tr.num_params(gpt2) == 124_439_808
  assert tr.num_params(llama) == 6_738_415_616
  # 6N + 12 L H Dh T, N without the position table (GPT-2) / input embedding (Llama).
  assert tr.flops_per_token(gpt2, 1024) == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024
  assert tr.flops_per_token(llama, 4096) == (6 * (6_738_415_616 - 32000 * 4096)
                                             + 12 * 32 * 4096 * 4096)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_close_to_float32(param_dtype):
  model, params = random_params(LLAMA, ("lm", "scalar"))
  config = tr.TransformerConfig(**{**LLAMA.__dict__, "dtype": "bfloat16",
                                   "param_dtype": param_dtype})
  bf_model = tr.Transformer(config, ("lm", "scalar"))
  bf_params = jax.tree.map(lambda x: x.astype(config.weight_dtype), params)
  tokens, mask, positions = left_padded(np.random.default_rng(5), [8, 5], 8, 48)
  ref, _ = forward(model, params, tokens, positions, mask)
  out, _ = forward(bf_model, bf_params, tokens, positions, mask)
  assert out["logits"].dtype == jnp.float32 and out["scalar"].dtype == jnp.float32
  real = mask == 1
  for key in ("logits", "scalar"):
    err = np.abs(out[key][real] - ref[key][real]).max()
    scale = np.abs(ref[key][real]).max()
    assert err < 0.05 * scale, (key, err, scale)  # observed: 2-3%
  # bfloat16 cache decoding runs and agrees with the bfloat16 full forward.
  cache = tr.init_cache(config, 2, 8)
  assert cache["layers"][0]["k"].dtype == jnp.bfloat16
  dec, cache = forward(bf_model, bf_params, tokens, positions, mask, cache)
  np.testing.assert_allclose(dec["logits"], out["logits"], atol=1e-2, rtol=1e-2)


def test_remat_same_loss_and_grads():
  model, params = random_params(GPT2, ("lm", "scalar"))
  tokens, mask, positions = left_padded(np.random.default_rng(6), [8, 6], 8, 48)

  def loss(p, m):
    out, _ = m.apply({"params": p}, tokens, positions, mask)
    logp = jax.nn.log_softmax(out["logits"][:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * mask[:, 1:]) + jnp.sum(out["scalar"] ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  ref_loss, ref_grads = grad_fn(params, model)
  for remat in ("full", "dots"):
    remat_model = tr.Transformer(tr.TransformerConfig(**{**GPT2.__dict__, "remat": remat}),
                                 ("lm", "scalar"))
    jaxpr = str(jax.make_jaxpr(loss, static_argnums=1)(params, remat_model))
    assert jaxpr.count("remat2[") == GPT2.num_layers, remat
    policy = "policy=DotsSaveable" if remat == "dots" else "policy=None"
    assert jaxpr.count(policy) == GPT2.num_layers, remat
    got_loss, got_grads = grad_fn(params, remat_model)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    assert jax.tree.structure(got_grads) == jax.tree.structure(ref_grads)
    # Remat reorders float32 sums: differences ~1e-6 of the largest gradient.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5),
                 got_grads, ref_grads)


def test_config_from_dict_and_validation():
  for size in ("tiny", "small", "bench"):
    d = base.model_config(size)
    config = tr.TransformerConfig.from_dict(d)
    assert config == tr.TransformerConfig.from_dict(d.to_dict())
    assert config.num_kv_heads == d.num_kv_heads and isinstance(config.rope_theta, float)
    hash(config)
  d = base.model_config("tiny").to_dict()
  with pytest.raises(ValueError, match=r"config\.model\.foo: unknown key"):
    tr.TransformerConfig.from_dict({**d, "foo": 1})
  with pytest.raises(ValueError, match=r"config\.model\.remat: missing"):
    tr.TransformerConfig.from_dict({k: v for k, v in d.items() if k != "remat"})
  bad = [({"num_kv_heads": 3}, "num_kv_heads"), ({"norm": "batch"}, "norm"),
         ({"use_bias": 1}, "use_bias"), ({"vocab_size": 0}, "vocab_size"),
         ({"head_dim": 15}, "head_dim"), ({"remat": "some"}, "remat"),
         ({"dtype": "float64"}, "dtype"), ({"norm_eps": -1.0}, "norm_eps")]
  for override, key in bad:
    with pytest.raises(ValueError, match=rf"config\.model\.{key}"):
      tr.TransformerConfig.from_dict({**d, **override})


def test_bad_inputs():
  model, params = random_params(LLAMA)
  tokens = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="key_mask"):
    forward(model, params, tokens, tokens, jnp.ones((2, 5)))
  with pytest.raises(ValueError, match="key_mask"):
    forward(model, params, tokens, tokens, jnp.ones((2, 4)), tr.init_cache(LLAMA, 2, 6))
  with pytest.raises(ValueError, match="heads"):
    tr.Transformer(LLAMA, ("value",)).init(jax.random.key(0), tokens, tokens, tokens)
