"""Hugging Face checkpoints in and out: Llama, Mistral, Qwen2, GPT-2.

  result = hf.load_hf(hf_dir, mesh, axis_rules)           # config.model dict + sharded params
  params = hf.load_params_into(hf_dir, state.params)      # onto an existing tree's shardings
  hf.save_hf(params, config.model, out_dir)               # config.json + model.safetensors

Import reads `config.json` and `model.safetensors` (or an index and its shards)
one tensor at a time and builds each leaf with `jax.make_array_from_callback`
straight into its target sharding, so the host holds at most one full HF tensor
and no device ever holds more than its own shards.
"""

import json
import os
import shutil
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import SingleDeviceSharding

from rlhf_jax.interop import hf_weights
from rlhf_jax.interop.hf_config import (SCORE_BIAS_KEY, SUPPORTED_MODEL_TYPES,
                                        architecture, hf_config_from_model,
                                        is_sequence_classification, model_config_from_hf,
                                        read_config)
from rlhf_jax.model import transformer
from rlhf_jax.train import sharding as sharding_lib

__all__ = ("HFImport", "SUPPORTED_MODEL_TYPES", "hf_config_from_model", "load_hf",
           "load_params_into", "model_config_from_hf", "read_config", "save_hf",
           "tokenizer_path")


class HFImport(NamedTuple):
  model_config: dict      # for config.model
  params: Any             # unboxed, sharded on the mesh
  tokenizer_path: str     # hf_dir/tokenizer.json, or "" when there is none
  heads: tuple            # ('lm',) or, for a ...ForSequenceClassification, ('scalar',)


def tokenizer_path(hf_dir: str) -> str:
  path = os.path.join(hf_dir, "tokenizer.json")
  return path if os.path.isfile(path) else ""


def _flat(params) -> dict:
  return traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")


def _plan(hf_dir: str, flat: dict):
  """Checks the checkpoint against `flat` params: (checkpoint, maps, scalar bias or None)."""
  cfg = read_config(hf_dir)
  arch = architecture(cfg)
  ckpt = hf_weights.Checkpoint(hf_dir)
  mt = arch["model_type"]
  candidates = [p + hf_weights.embed_name(mt) for p in hf_weights.prefixes(mt)]
  prefix = next((p for p, c in zip(hf_weights.prefixes(mt), candidates) if c in ckpt), None)
  if prefix is None:
    raise ValueError(f"{hf_dir}: HF tensor {' or '.join(map(repr, candidates))} is missing "
                     "(not a checkpoint of this model_type?)")
  pos = flat.get("pos_embed/embedding")
  pos_rows = None
  if pos is not None and arch["position"] == "learned":
    pos_rows = min(pos.shape[0], arch["max_position_embeddings"])
  maps = hf_weights.trunk_maps(arch, prefix, pos_rows)
  tied = arch["tie_embeddings"]
  has_lm, has_scalar = "lm_head/kernel" in flat, "scalar_head/kernel" in flat
  ignored = set()
  if has_lm:   # from a tied HF model, our untied head starts as the embedding
    maps.append(hf_weights.lm_head_map(arch, prefix + hf_weights.embed_name(mt) if tied
                                       else "lm_head.weight"))
  elif not tied and "lm_head.weight" in ckpt and not has_scalar:
    raise ValueError(f"{hf_dir}: the checkpoint has an untied 'lm_head.weight' "
                     "(tie_word_embeddings=false) but the params have no lm_head/kernel: set "
                     "config.model.tie_embeddings=False")
  if tied or not has_lm:
    ignored.add("lm_head.weight")
  score = has_scalar and "score.weight" in ckpt
  if score:
    maps.append(hf_weights.score_map(arch))
  else:
    ignored.add("score.weight")

  for m in maps:
    if m.hf not in ckpt:
      raise ValueError(f"{hf_dir}: HF tensor {m.hf!r} (for params/{m.ours}) is missing from "
                       "the checkpoint")
    if ckpt.shape(m.hf) != m.hf_shape:
      raise ValueError(f"{ckpt.file(m.hf)}: HF tensor {m.hf!r} has shape {ckpt.shape(m.hf)}, "
                       f"but config.json implies {m.hf_shape}")
    if m.ours not in flat:
      raise ValueError(f"{hf_dir}: HF tensor {m.hf!r} has no counterpart params/{m.ours}: "
                       "config.model does not match config.json (see model_config_from_hf)")
    if tuple(flat[m.ours].shape) != m.shape:
      raise ValueError(f"{hf_dir}: HF tensor {m.hf!r} of shape {ckpt.shape(m.hf)} maps to "
                       f"shape {m.shape}, but params/{m.ours} has shape "
                       f"{tuple(flat[m.ours].shape)}")
  extra = [k for k in ckpt.unused({m.hf for m in maps}) if k not in ignored]
  if extra:
    raise ValueError(f"{hf_dir}: HF tensor {extra[0]!r} has no counterpart in the params "
                     f"({len(extra)} such tensors: {', '.join(extra[:4])}...); config.model "
                     "does not match config.json (biases?)")
  covered = {m.ours for m in maps}
  missing = [k for k in flat if k not in covered and not k.startswith("scalar_head/")]
  if missing:
    raise ValueError(f"{hf_dir}: params/{missing[0]} has no HF tensor ({len(missing)} such "
                     "leaves); config.model does not match config.json (biases? positions?)")
  bias = None
  if score and "scalar_head/bias" in flat:
    bias = float(cfg.get(SCORE_BIAS_KEY, 0.0))
  return ckpt, maps, bias


def _place(src: np.ndarray, like) -> jax.Array:
  """`src` (host, our layout) as a global array with `like`'s sharding and dtype."""
  sharding = getattr(like, "sharding", None) or SingleDeviceSharding(jax.devices()[0])
  dtype = like.dtype
  out = jax.make_array_from_callback(tuple(like.shape), sharding,
                                     lambda idx: np.array(src[idx], dtype=dtype))
  return out.block_until_ready()


def load_params_into(hf_dir: str, params: Any) -> Any:
  """HF weights onto `params`' shardings and dtypes; returns a new (unboxed) tree.

  params: a tree of `jax.Array`s, or of `jax.ShapeDtypeStruct`s carrying a
  sharding (nothing is allocated for them beforehand). Every leaf with an HF
  counterpart is replaced; `scalar_head/*` leaves keep their value unless the
  checkpoint has a `score.weight` (a ...ForSequenceClassification), in which case
  the bias becomes 0 (HF's score has none) or our exported `rlhf_jax_score_bias`.
  Shapes are checked before anything is read: a mismatch, a missing tensor or
  shard, or an HF tensor without a counterpart raises, naming the tensor.
  """
  flat = _flat(params)
  ckpt, maps, bias = _plan(hf_dir, flat)
  out = dict(flat)
  for m in maps:
    part = ckpt.read(m.hf, m.index)       # the only full tensor alive on the host
    out[m.ours] = _place(m.to_ours(part), flat[m.ours])
    del part
  if bias is not None:
    like = flat["scalar_head/bias"]
    out["scalar_head/bias"] = _place(np.full(like.shape, bias, np.float32), like)
  return traverse_util.unflatten_dict(out, sep="/")


def load_hf(hf_dir: str, mesh, axis_rules, *, heads: tuple | None = None,
            max_len: int | None = None, dtype: str = "float32", param_dtype: str = "float32",
            remat: str = "none", rng: jax.Array | None = None) -> HFImport:
  """An HF directory -> (config.model dict, params sharded by `axis_rules` on `mesh`, ...).

  heads defaults to ('scalar',) for a ...ForSequenceClassification, else ('lm',).
  Leaves the checkpoint lacks (a new scalar head) are initialised from `rng`
  (default key 0); the rest of the model is never initialised.
  """
  cfg = read_config(hf_dir)
  model_config = model_config_from_hf(cfg, max_len=max_len, dtype=dtype,
                                      param_dtype=param_dtype, remat=remat)
  if heads is None:
    heads = ("scalar",) if is_sequence_classification(cfg) else ("lm",)
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(model_config),
                                  tuple(heads))
  rng = jax.random.key(0) if rng is None else rng
  init_fn = lambda r: transformer.init_params(model, r)
  with nn.logical_axis_rules(axis_rules):
    abstract = jax.eval_shape(init_fn, rng)
    shardings = sharding_lib.logical_shardings(abstract, mesh, axis_rules)
  targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         nn.meta.unbox(abstract), shardings)
  flat = _flat(load_params_into(hf_dir, targets))
  fresh = {k: v.sharding for k, v in flat.items() if isinstance(v, jax.ShapeDtypeStruct)}
  if fresh:   # XLA prunes the rest of the init: only these leaves are computed
    pick = lambda r: {k: v for k, v in _flat(init_fn(r)).items() if k in fresh}
    with nn.logical_axis_rules(axis_rules):
      flat.update(jax.jit(pick, out_shardings=fresh)(rng))
  params = traverse_util.unflatten_dict(flat, sep="/")
  return HFImport(model_config, params, tokenizer_path(hf_dir), tuple(heads))


def _host(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    raise ValueError("save_hf: params span several processes; gather them first "
                     "(jax.experimental.multihost_utils.process_allgather)")
  return np.asarray(jax.device_get(leaf))


def _clear_weights(out_dir: str):
  """Removes weight files of an earlier export, so that no stale shard is picked up."""
  for name in os.listdir(out_dir):
    if name in (hf_weights.SINGLE_FILE, hf_weights.INDEX_FILE) or (
        name.startswith("model-") and name.endswith(".safetensors")):
      os.remove(os.path.join(out_dir, name))


def save_hf(params: Any, model_config: Mapping[str, Any], out_dir: str, *,
            model_type: str | None = None, head: str = "auto", dtype: str | None = None,
            max_shard_bytes: int = 2 << 30, tokenizer_path: str | None = None,
            extra_config: Mapping[str, Any] | None = None,
            drop_scalar_bias: bool = False) -> list:
  """Writes `config.json` and safetensors weights that `transformers` loads.

  model_type: llama / mistral / qwen2 / gpt2; default gpt2 for learned
  positions, qwen2 for q/k/v-only biases, else llama. head: 'lm'
  (...ForCausalLM), 'scalar' (...ForSequenceClassification with num_labels=1,
  `score.weight = scalar_head/kernel.T`) or 'auto' (scalar when the params have
  a scalar head). HF's score has no bias: a nonzero `scalar_head/bias` is an
  error unless `drop_scalar_bias`, which writes it to config.json as
  `rlhf_jax_score_bias` (read back by our import; transformers' scores are then
  shifted by it, which leaves Bradley-Terry preferences unchanged). dtype:
  tensor dtype in the files (default config.model.param_dtype). extra_config:
  added to config.json (token ids, say). Returns the weight file names.
  """
  flat = _flat(params)
  mc = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  if head == "auto":
    head = "scalar" if "scalar_head/kernel" in flat else "lm"
  np_dtype = np.dtype(jnp.dtype(dtype or mc["param_dtype"]))
  extra = dict(extra_config or {})
  if head == "scalar":
    if "scalar_head/kernel" not in flat:
      raise ValueError("save_hf: head='scalar' but the params have no scalar_head/kernel")
    bias = float(_host(flat["scalar_head/bias"]).reshape(-1)[0]) if (
        "scalar_head/bias" in flat) else 0.0
    if bias != 0.0:
      if not drop_scalar_bias:
        raise ValueError(f"save_hf: params/scalar_head/bias is {bias!r}, and HF's score layer "
                         "has no bias; pass drop_scalar_bias=True to export without it")
      extra[SCORE_BIAS_KEY] = bias
  hf_cfg = hf_config_from_model(mc, model_type=model_type, head=head,
                                torch_dtype=np_dtype.name, extra=extra)
  arch = architecture(hf_cfg)
  maps = hf_weights.trunk_maps(arch, hf_weights.prefixes(arch["model_type"])[0])
  if head == "lm" and not arch["tie_embeddings"]:
    maps.append(hf_weights.lm_head_map(arch))
  if head == "scalar":
    maps.append(hf_weights.score_map(arch))
  for m in maps:
    if m.ours not in flat:
      raise ValueError(f"save_hf: params/{m.ours} (for HF tensor {m.hf!r}) is missing")
    if tuple(flat[m.ours].shape) != m.shape:
      raise ValueError(f"save_hf: params/{m.ours} has shape {tuple(flat[m.ours].shape)}, "
                       f"config.model implies {m.shape} (HF tensor {m.hf!r})")

  groups: dict = {}
  for m in maps:
    groups.setdefault(m.hf, []).append(m)

  def read_group(name):
    group = groups[name]
    if len(group) == 1 and group[0].index is None:
      return np.asarray(group[0].to_hf(_host(flat[group[0].ours])), np_dtype)
    out = np.zeros(group[0].hf_shape, np_dtype)
    for m in group:
      out[m.index] = m.to_hf(_host(flat[m.ours]))
    return out

  os.makedirs(out_dir, exist_ok=True)
  _clear_weights(out_dir)
  files = hf_weights.write_safetensors(
      out_dir, [(k, g[0].hf_shape, np_dtype) for k, g in groups.items()], read_group,
      max_shard_bytes)
  if tokenizer_path:
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2, sort_keys=True)
  return files
