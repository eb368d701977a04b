"""Hugging Face `config.json` <-> `config.model`, for Llama, Mistral, Qwen2 and GPT-2.

Reads both the transformers 4.x spelling (`rope_theta`, `rope_scaling`) and the 5.x
one (`rope_parameters`). Anything this decoder cannot reproduce exactly (rope
scaling, a sliding window shorter than the sequences, other activations, biases
on only some layers) is a ValueError that names the field.
"""

import json
import os
from typing import Any, Mapping

from rlhf_jax.model import transformer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
SEQUENCE_CLASSIFICATION = {t: f"{n}ForSequenceClassification" for t, n in
                           (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"),
                            ("gpt2", "GPT2"))}
# Our extension key: the scalar head's bias, which HF's `score` layer lacks.
SCORE_BIAS_KEY = "rlhf_jax_score_bias"
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")
_REQUIRED = object()


def read_config(hf_dir: str) -> dict:
  """Parses `hf_dir/config.json`."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (expected a Hugging Face model directory)")
  with open(path) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
  return cfg


def _get(cfg: Mapping[str, Any], key: str, default=_REQUIRED, kind=None):
  v = cfg.get(key, default)
  if v is None and default is not _REQUIRED:
    v = default
  if v is _REQUIRED or v is None:
    raise ValueError(f"config.json: missing field {key!r} (model_type "
                     f"{cfg.get('model_type')!r})")
  if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
    raise ValueError(f"config.json: {key} must be a positive int, got {v!r}")
  if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
    raise ValueError(f"config.json: {key} must be a positive number, got {v!r}")
  return float(v) if kind is float else v


def is_sequence_classification(cfg: Mapping[str, Any]) -> bool:
  return any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or ())


def _rope_theta(cfg: Mapping[str, Any]) -> float:
  """rope_theta, refusing any rope scaling (4.x `rope_scaling`, 5.x `rope_parameters`)."""
  scaling = cfg.get("rope_scaling")
  if scaling:
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind != "default":
      raise ValueError(f"config.json: rope_scaling={scaling!r} is not supported (only plain "
                       "RoPE; rope_scaling must be null)")
  params = cfg.get("rope_parameters")
  if params is not None:
    if not isinstance(params, dict):
      raise ValueError(f"config.json: rope_parameters must be an object, got {params!r}")
    if params.get("rope_type", "default") != "default":
      raise ValueError(f"config.json: rope_parameters.rope_type={params['rope_type']!r} is "
                       "not supported (only 'default')")
    if "rope_theta" in params:
      return _get(params, "rope_theta", kind=float)
  factor = cfg.get("partial_rotary_factor", 1.0)
  if factor not in (None, 1, 1.0):
    raise ValueError(f"config.json: partial_rotary_factor={factor!r} is not supported (must be 1)")
  return _get(cfg, "rope_theta", 10000.0, kind=float)


def architecture(cfg: Mapping[str, Any]) -> dict:
  """Everything `config.model` takes from an HF config except max_len and dtypes.

  Returns a dict of `TransformerConfig` fields plus `model_type` and
  `max_position_embeddings`. Raises ValueError naming the field for anything
  that this decoder does not compute exactly as transformers does.
  """
  model_type = cfg.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"config.json: model_type {model_type!r} is not supported "
                     f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  if model_type == "gpt2":
    return _gpt2_architecture(cfg)
  act = cfg.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"config.json: hidden_act={act!r} is not supported (SwiGLU needs 'silu')")
  embed = _get(cfg, "hidden_size", kind=int)
  heads = _get(cfg, "num_attention_heads", kind=int)
  kv_heads = _get(cfg, "num_key_value_heads", heads, kind=int)
  if "head_dim" in cfg and cfg["head_dim"] is not None:
    head_dim = _get(cfg, "head_dim", kind=int)
  else:
    if embed % heads:
      raise ValueError(f"config.json: hidden_size={embed} is not a multiple of "
                       f"num_attention_heads={heads} and head_dim is not given")
    head_dim = embed // heads
  use_bias, qkv_bias = False, model_type == "qwen2"
  if model_type == "llama":
    attn_bias, mlp_bias = bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias"))
    if attn_bias != mlp_bias:
      raise ValueError(f"config.json: attention_bias={attn_bias} with mlp_bias={mlp_bias} is "
                       "not supported (biases on every projection or on none)")
    use_bias = attn_bias
  return dict(
      model_type=model_type, vocab_size=_get(cfg, "vocab_size", kind=int), embed_dim=embed,
      num_layers=_get(cfg, "num_hidden_layers", kind=int), num_heads=heads,
      num_kv_heads=kv_heads, head_dim=head_dim,
      mlp_dim=_get(cfg, "intermediate_size", kind=int),
      max_position_embeddings=_get(cfg, "max_position_embeddings", kind=int), norm="rms",
      norm_eps=_get(cfg, "rms_norm_eps", 1e-6, kind=float), position="rope",
      rope_theta=_rope_theta(cfg), mlp="swiglu", use_bias=use_bias, qkv_bias=qkv_bias,
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _gpt2_architecture(cfg):
  embed = _get(cfg, "n_embd", kind=int)
  heads = _get(cfg, "n_head", kind=int)
  if embed % heads:
    raise ValueError(f"config.json: n_embd={embed} is not a multiple of n_head={heads}")
  act = cfg.get("activation_function", "gelu_new")
  if act not in _GELU_TANH:
    raise ValueError(f"config.json: activation_function={act!r} is not supported (the GELU "
                     f"MLP is the tanh approximation: {' or '.join(_GELU_TANH)})")
  for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
    if bool(cfg.get(key, want)) != want:
      raise ValueError(f"config.json: {key}={cfg[key]!r} is not supported (must be {want})")
  positions = _get(cfg, "n_positions", cfg.get("n_ctx"), kind=int)
  return dict(
      model_type="gpt2", vocab_size=_get(cfg, "vocab_size", kind=int), embed_dim=embed,
      num_layers=_get(cfg, "n_layer", kind=int), num_heads=heads, num_kv_heads=heads,
      head_dim=embed // heads, mlp_dim=_get(cfg, "n_inner", 4 * embed, kind=int),
      max_position_embeddings=positions, norm="layer",
      norm_eps=_get(cfg, "layer_norm_epsilon", 1e-5, kind=float), position="learned",
      rope_theta=10000.0, mlp="gelu", use_bias=True, qkv_bias=False,
      tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _check_sliding_window(cfg, arch, max_len):
  """A sliding window is harmless when every sequence fits in it; otherwise an error."""
  window = cfg.get("sliding_window")
  if arch["model_type"] == "mistral":
    in_use = window is not None
  elif arch["model_type"] == "qwen2" and cfg.get("use_sliding_window"):
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
      in_use = any(t != "full_attention" for t in layer_types)
    else:   # transformers 4.x: layers from max_window_layers on slide
      in_use = cfg.get("max_window_layers", arch["num_layers"]) < arch["num_layers"]
  else:
    in_use = False
  if in_use and window is not None and window < max_len:
    raise ValueError(
        f"config.json: sliding_window={window} is in use and shorter than max_len={max_len}; "
        "this decoder only has full causal attention. Import with max_len <= "
        f"{window}: every sequence then fits in the window and attention is identical")


def model_config_from_hf(cfg: Mapping[str, Any], *, max_len: int | None = None,
                         dtype: str = "float32", param_dtype: str = "float32",
                         remat: str = "none") -> dict:
  """HF config dict -> a `config.model` dict (every `TransformerConfig` field).

  `max_len` defaults to `max_position_embeddings`; a smaller one keeps the
  sliding-window check happy and, for GPT-2, keeps the first `max_len` rows of
  the learned position table.
  """
  arch = architecture(cfg)
  limit = arch.pop("max_position_embeddings")
  max_len = limit if max_len is None else max_len
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
    raise ValueError(f"max_len must be a positive int, got {max_len!r}")
  if arch["position"] == "learned" and max_len > limit:
    raise ValueError(f"max_len={max_len} exceeds the learned position table "
                     f"(config.json: n_positions={limit})")
  _check_sliding_window(cfg, arch, max_len)
  arch.pop("model_type")
  model = dict(arch, max_len=max_len, dtype=dtype, param_dtype=param_dtype, remat=remat)
  transformer.TransformerConfig.from_dict(model)   # validates
  return model


def default_model_type(model_config: Mapping[str, Any]) -> str:
  """The HF architecture our config maps to: gpt2 for learned positions, qwen2 for
  q/k/v-only biases, llama otherwise."""
  if model_config["position"] == "learned":
    return "gpt2"
  return "qwen2" if model_config["qkv_bias"] and not model_config["use_bias"] else "llama"


def _check_exportable(c: transformer.TransformerConfig, model_type: str):
  def fail(field, msg):
    raise ValueError(f"config.model.{field}={getattr(c, field)!r}: {msg} "
                     f"(exporting as model_type {model_type!r})")

  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not supported for export "
                     f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  if model_type == "gpt2":
    for field, want in (("norm", "layer"), ("position", "learned"), ("mlp", "gelu"),
                        ("use_bias", True), ("qkv_bias", False)):
      if getattr(c, field) != want:
        fail(field, f"GPT-2 needs {want!r}")
    if c.num_kv_heads != c.num_heads:
      fail("num_kv_heads", f"GPT-2 has no grouped-query attention (num_heads={c.num_heads})")
    if c.num_heads * c.head_dim != c.embed_dim:
      fail("head_dim", f"GPT-2 needs num_heads * head_dim == embed_dim={c.embed_dim}")
    return
  for field, want in (("norm", "rms"), ("position", "rope"), ("mlp", "swiglu")):
    if getattr(c, field) != want:
      fail(field, f"{model_type} needs {want!r}")
  if model_type == "qwen2" and (c.use_bias or not c.qkv_bias):
    fail("qkv_bias", "Qwen2 has biases on q, k, v only (qkv_bias=True, use_bias=False)")
  if model_type == "mistral" and (c.use_bias or c.qkv_bias):
    fail("use_bias" if c.use_bias else "qkv_bias", "Mistral has no biases")
  if model_type == "llama" and c.qkv_bias and not c.use_bias:
    fail("qkv_bias", "Llama has no q/k/v-only biases; export as model_type 'qwen2'")


def hf_config_from_model(model_config: Mapping[str, Any], *, model_type: str | None = None,
                         head: str = "lm", torch_dtype: str = "float32",
                         extra: Mapping[str, Any] | None = None) -> dict:
  """`config.model` -> an HF `config.json` dict.

  head: 'lm' (`...ForCausalLM` / `GPT2LMHeadModel`) or 'scalar'
  (`...ForSequenceClassification`, num_labels=1). `extra` entries (token ids,
  say) are added last and may override.
  """
  d = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  c = transformer.TransformerConfig.from_dict(d)
  model_type = model_type or default_model_type(d)
  _check_exportable(c, model_type)
  if head not in ("lm", "scalar"):
    raise ValueError(f"head must be 'lm' or 'scalar', got {head!r}")
  arch = (CAUSAL_LM if head == "lm" else SEQUENCE_CLASSIFICATION)[model_type]
  out = {"architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size,
         "tie_word_embeddings": c.tie_embeddings, "torch_dtype": torch_dtype,
         "initializer_range": 0.02, "use_cache": True}
  if model_type == "gpt2":
    out.update(n_embd=c.embed_dim, n_layer=c.num_layers, n_head=c.num_heads,
               n_inner=c.mlp_dim, n_positions=c.max_len, n_ctx=c.max_len,
               layer_norm_epsilon=c.norm_eps, activation_function="gelu_new",
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
               scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
  else:
    out.update(hidden_size=c.embed_dim, num_hidden_layers=c.num_layers,
               num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
               head_dim=c.head_dim, intermediate_size=c.mlp_dim, hidden_act="silu",
               max_position_embeddings=c.max_len, rms_norm_eps=c.norm_eps,
               rope_theta=c.rope_theta, rope_scaling=None,
               rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
               attention_dropout=0.0)
    if model_type == "llama":
      out.update(attention_bias=c.use_bias, mlp_bias=c.use_bias, pretraining_tp=1)
    elif model_type == "mistral":
      out.update(sliding_window=None)
    else:
      out.update(use_sliding_window=False, sliding_window=None,
                 max_window_layers=c.num_layers)
  if head == "scalar":
    out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  out.update(extra or {})
  return out
