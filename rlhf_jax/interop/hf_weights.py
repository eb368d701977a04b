"""Which HF tensor holds which of our params, in which layout; safetensors I/O.

HF `nn.Linear` weights are `[out, in]`; our kernels are `[in, out]` with the
attention projections split as `[embed, heads, head_dim]` and the output
projection as `[heads, head_dim, embed]`. GPT-2's `Conv1D` is already `[in, out]`
and fuses q, k, v into `c_attn` `[embed, 3 * embed]`. HF Llama checkpoints store
q/k in the rotate-half layout that `transformer.apply_rope` uses, so no
permutation is needed.
"""

import dataclasses
import json
import math
import os
import re

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Non-parameter buffers some checkpoints carry (GPT-2 causal masks, rotary caches).
_BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$")


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One of our leaves <-> (part of) one HF tensor.

  layout 'linear': the HF part is `[out, in]` and our leaf is its transpose
  reshaped to `shape`; 'same': our leaf is the HF part reshaped. `index` selects
  the part of the HF tensor (`hf_shape`) that holds this leaf (fused c_attn, or the
  first rows of a position table); None is the whole tensor.
  """
  ours: str
  hf: str
  shape: tuple
  hf_shape: tuple
  layout: str = "same"
  index: tuple | None = None

  @property
  def part_shape(self) -> tuple:
    if self.index is None:
      return self.hf_shape
    return tuple(len(range(*s.indices(n))) for s, n in zip(self.index, self.hf_shape))

  def to_ours(self, part: np.ndarray) -> np.ndarray:
    """HF part -> our layout; a view whenever numpy can make one."""
    return (part.T if self.layout == "linear" else part).reshape(self.shape)

  def to_hf(self, leaf: np.ndarray) -> np.ndarray:
    if self.layout == "linear":
      return leaf.reshape(self.part_shape[::-1]).T
    return leaf.reshape(self.part_shape)


def _linear(ours, hf, in_shape, out_shape):
  """An `nn.Linear` weight `[prod(out), prod(in)]` <-> our kernel `[*in, *out]`."""
  return TensorMap(ours, hf, tuple(in_shape) + tuple(out_shape),
                   (math.prod(out_shape), math.prod(in_shape)), "linear")


def _same(ours, hf, shape, hf_shape=None, index=None):
  return TensorMap(ours, hf, tuple(shape), tuple(hf_shape or (math.prod(shape),)),
                   "same", index)


def prefixes(model_type: str) -> tuple:
  """Trunk name prefixes to try: a `...For*` model's, then a bare base model's."""
  return ("transformer.", "") if model_type == "gpt2" else ("model.", "")


def embed_name(model_type: str) -> str:
  return "wte.weight" if model_type == "gpt2" else "embed_tokens.weight"


def trunk_maps(arch: dict, prefix: str, pos_rows: int | None = None) -> list:
  """Maps for the embedding, every layer and the final norm."""
  if arch["model_type"] == "gpt2":
    return _gpt2_trunk(arch, prefix, pos_rows)
  e, h, k, dh, m = (arch[n] for n in ("embed_dim", "num_heads", "num_kv_heads", "head_dim",
                                      "mlp_dim"))
  qkv_bias = arch["use_bias"] or arch["qkv_bias"]
  maps = [_same("embed/embedding", prefix + "embed_tokens.weight",
                (arch["vocab_size"], e), (arch["vocab_size"], e))]
  for i in range(arch["num_layers"]):
    o, p = f"layer_{i}/", f"{prefix}layers.{i}."
    maps += [_same(o + "attn_norm/scale", p + "input_layernorm.weight", (e,)),
             _same(o + "mlp_norm/scale", p + "post_attention_layernorm.weight", (e,))]
    for name, proj, heads in (("query", "q_proj", h), ("key", "k_proj", k),
                              ("value", "v_proj", k)):
      maps.append(_linear(f"{o}attn/{name}/kernel", f"{p}self_attn.{proj}.weight", (e,),
                          (heads, dh)))
      if qkv_bias:
        maps.append(_same(f"{o}attn/{name}/bias", f"{p}self_attn.{proj}.bias", (heads, dh)))
    maps.append(_linear(o + "attn/out/kernel", p + "self_attn.o_proj.weight", (h, dh), (e,)))
    for name, proj, d_in, d_out in (("gate", "gate_proj", e, m), ("up", "up_proj", e, m),
                                    ("down", "down_proj", m, e)):
      maps.append(_linear(f"{o}mlp/{name}/kernel", f"{p}mlp.{proj}.weight", (d_in,), (d_out,)))
    if arch["use_bias"]:
      maps += [_same(o + "attn/out/bias", p + "self_attn.o_proj.bias", (e,)),
               _same(o + "mlp/gate/bias", p + "mlp.gate_proj.bias", (m,)),
               _same(o + "mlp/up/bias", p + "mlp.up_proj.bias", (m,)),
               _same(o + "mlp/down/bias", p + "mlp.down_proj.bias", (e,))]
  maps.append(_same("final_norm/scale", prefix + "norm.weight", (e,)))
  return maps


def _gpt2_trunk(arch, prefix, pos_rows):
  e, h, dh, m = (arch[n] for n in ("embed_dim", "num_heads", "head_dim", "mlp_dim"))
  rows = arch["max_position_embeddings"]
  pos_rows = rows if pos_rows is None else pos_rows
  maps = [_same("embed/embedding", prefix + "wte.weight", (arch["vocab_size"], e),
                (arch["vocab_size"], e)),
          _same("pos_embed/embedding", prefix + "wpe.weight", (pos_rows, e), (rows, e),
                None if pos_rows == rows else (slice(0, pos_rows), slice(None)))]

  def norm(ours, hf):
    return [_same(ours + "/scale", hf + ".weight", (e,)), _same(ours + "/bias", hf + ".bias", (e,))]

  for i in range(arch["num_layers"]):
    o, p = f"layer_{i}/", f"{prefix}h.{i}."
    maps += norm(o + "attn_norm", p + "ln_1") + norm(o + "mlp_norm", p + "ln_2")
    for j, name in enumerate(("query", "key", "value")):
      cols = slice(j * e, (j + 1) * e)
      maps += [_same(f"{o}attn/{name}/kernel", p + "attn.c_attn.weight", (e, h, dh),
                     (e, 3 * e), (slice(None), cols)),
               _same(f"{o}attn/{name}/bias", p + "attn.c_attn.bias", (h, dh), (3 * e,),
                     (cols,))]
    maps += [_same(o + "attn/out/kernel", p + "attn.c_proj.weight", (h, dh, e), (e, e)),
             _same(o + "attn/out/bias", p + "attn.c_proj.bias", (e,)),
             _same(o + "mlp/fc/kernel", p + "mlp.c_fc.weight", (e, m), (e, m)),
             _same(o + "mlp/fc/bias", p + "mlp.c_fc.bias", (m,)),
             _same(o + "mlp/proj/kernel", p + "mlp.c_proj.weight", (m, e), (m, e)),
             _same(o + "mlp/proj/bias", p + "mlp.c_proj.bias", (e,))]
  return maps + norm("final_norm", prefix + "ln_f")


def lm_head_map(arch: dict, hf_name: str = "lm_head.weight") -> TensorMap:
  """Our untied `lm_head/kernel [embed, vocab]` <- `lm_head.weight` (or, for an HF
  model with tied embeddings, the embedding itself) `[vocab, embed]`."""
  return _linear("lm_head/kernel", hf_name, (arch["embed_dim"],), (arch["vocab_size"],))


def score_map(arch: dict) -> TensorMap:
  """Our `scalar_head/kernel [embed, 1]` <- `score.weight [1, embed]` (no bias in HF)."""
  return _linear("scalar_head/kernel", "score.weight", (arch["embed_dim"],), (1,))


class Checkpoint:
  """The tensors of an HF directory: one `model.safetensors` or an index and shards.

  Lists names, shapes and dtypes from the headers only; `read` opens the file
  for one tensor at a time, so no file stays mapped between reads.
  """

  def __init__(self, hf_dir: str):
    self.dir = hf_dir
    index_path = os.path.join(hf_dir, INDEX_FILE)
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{index_path}: not a safetensors index with a 'weight_map' "
                           f"({type(e).__name__}: {e})") from None
      files = sorted(set(weight_map.values()))
      for name in files:
        if not os.path.isfile(os.path.join(hf_dir, name)):
          listed = sorted(k for k, v in weight_map.items() if v == name)
          raise FileNotFoundError(f"{index_path}: shard {name!r} is missing from {hf_dir} "
                                  f"(it holds {len(listed)} tensors, e.g. {listed[0]!r})")
    elif os.path.isfile(single):
      weight_map, files = None, [SINGLE_FILE]
    else:
      found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else []
      hint = (" (pytorch_model.bin checkpoints are not supported: re-save with "
              "safe_serialization=True)" if any(f.endswith(".bin") for f in found) else "")
      raise FileNotFoundError(f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}")
    self.tensors = {}   # name -> (file, shape, dtype)
    for name in files:
      with safe_open(os.path.join(hf_dir, name), framework="numpy") as f:
        for key in f.keys():
          s = f.get_slice(key)
          self.tensors[key] = (name, tuple(s.get_shape()), s.get_dtype())
    for key, name in (weight_map or {}).items():
      if key not in self.tensors:
        raise ValueError(f"{index_path}: tensor {key!r} is listed in {name!r} but is not in it")

  def __contains__(self, name: str) -> bool:
    return name in self.tensors

  def shape(self, name: str) -> tuple:
    return self.tensors[name][1]

  def file(self, name: str) -> str:
    return os.path.join(self.dir, self.tensors[name][0])

  def read(self, name: str, index: tuple | None = None) -> np.ndarray:
    """The tensor (or `index` of it, reading only that part) as a numpy array."""
    return read_tensor(self.file(name), name, index)

  def unused(self, used: set) -> list:
    return sorted(k for k in self.tensors if k not in used and not _BUFFERS.search(k))


def read_tensor(path: str, name: str, index: tuple | None = None) -> np.ndarray:
  """Reads one tensor (bfloat16 comes back as an ml_dtypes array)."""
  with safe_open(path, framework="numpy") as f:
    return f.get_slice(name)[index] if index is not None else f.get_tensor(name)


def write_safetensors(out_dir: str, groups: list, read_group, max_shard_bytes: int) -> list:
  """Writes tensors into one file or into shards plus an index.

  groups: [(name, shape, dtype)] in file order; read_group(name) -> np.ndarray.
  Shards are planned from shapes first, then written one at a time, so the host
  holds at most one shard's tensors. Returns the written file names.
  """
  shards, size = [[]], 0
  for name, shape, dtype in groups:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  n = len(shards)
  names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                        for i in range(n)]
  total = 0
  for fname, shard in zip(names, shards):
    tensors = {k: np.ascontiguousarray(read_group(k)) for k in shard}
    total += sum(t.nbytes for t in tensors.values())
    save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
    del tensors
  if n > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {k: f for f, shard in zip(names, shards) for k in shard}}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  return names

