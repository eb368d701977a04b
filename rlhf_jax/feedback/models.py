"""A language model used for feedback (a judge, or the policy that critiques and revises
itself): an rlhf_jax run or a Hugging Face directory, with its tokenizer and optional
chat template; batched encoding and sampling of texts.

  lm = models.load("runs/sft")                  # workdir: config.json + checkpoints/
  lm = models.load("hf/Qwen2-0.5B-Instruct")    # config.json + safetensors + tokenizer.json
  texts = models.sample_texts(lm, prompts, rng, add_bos=True, max_new_tokens=48, batch_size=16)

Batches are padded to `batch_size` rows and to a length rounded up to a multiple of
`bucket`, so each padded shape compiles once.
"""

import json
import os
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import tokenizers
from rlhf_jax.interop import hf
from rlhf_jax.model import sampling
from rlhf_jax.model import transformer
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import sharding as sharding_lib


class LanguageModel(NamedTuple):
  model: transformer.Transformer   # with the 'lm' head
  params: Any                      # unboxed
  tokenizer: tokenizers.Tokenizer
  chat_template: str               # Jinja source, '' when the model has none
  special_tokens: dict             # {'bos_token': str, 'eos_token': str} for the template
  source: str                      # absolute path it was loaded from
  kind: str                        # 'run' | 'hf'

  @property
  def max_len(self) -> int:
    return self.model.config.max_len


def _single_device_mesh():
  return sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                jax.devices()[:1])


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno} ({what}): {e.msg}") from None


def is_hf_dir(path: str) -> bool:
  """A Hugging Face model directory: its config.json has a `model_type`."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    return False
  config = _read_json(config_path, "model config")
  return isinstance(config, dict) and "model_type" in config


def _load_run(path: str, mesh, heads) -> LanguageModel:
  config = ml_collections.ConfigDict(_read_json(os.path.join(path, "config.json"),
                                                "run config"))
  if "model" not in config or "tokenizer" not in config:
    raise ValueError(f"{path}/config.json: neither an rlhf_jax run's config (no 'model' and "
                     "'tokenizer' sections) nor a Hugging Face config (no 'model_type')")
  checkpoint_lib.checkpoint_dir(path)      # fails early, naming `path`
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(config.model), heads)
  tokens = jnp.zeros((1, 8), jnp.int32)
  init_fn = lambda r: model.init(r, tokens, tokens, jnp.ones_like(tokens))["params"]
  params, _ = sharding_lib.init_sharded(init_fn, jax.random.key(0), mesh,
                                        sharding_lib.rules(config))
  params = checkpoint_lib.load_params(path, params)
  return LanguageModel(model, params, tokenizers.make_tokenizer(config.tokenizer), "", {},
                       path, "run")


def _token_string(value) -> str:
  """A tokenizer_config.json token entry: a string or {'content': ...} (or null)."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else ""


def _hf_token_ids(hf_config: dict, tokenizer_config: dict, tokenizer_json: str) -> dict:
  """pad/bos/eos ids: config.json's `<role>_token_id`, else the id of tokenizer_config.json's
  `<role>_token`; pad falls back to eos. Missing ones are left to JsonTokenizer's lookup."""
  import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
  vocab = hf_tokenizers.Tokenizer.from_file(tokenizer_json)
  ids = {}
  for role in ("bos", "eos", "pad"):
    value = hf_config.get(f"{role}_token_id")
    if isinstance(value, list):
      value = value[0] if value else None
    if value is None:
      text = _token_string(tokenizer_config.get(f"{role}_token"))
      value = vocab.token_to_id(text) if text else None
    ids[f"{role}_id"] = value
  if ids["pad_id"] is None:
    ids["pad_id"] = ids["eos_id"]
  return {k: v for k, v in ids.items() if v is not None}


def _hf_chat_template(path: str, tokenizer_config: dict) -> str:
  template = tokenizer_config.get("chat_template")
  if isinstance(template, list):   # [{'name': 'default', 'template': ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if isinstance(template, str) and template:
    return template
  jinja_path = os.path.join(path, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path) as f:
      return f.read()
  return ""


def _load_hf(path: str, mesh, axis_rules, max_len) -> LanguageModel:
  result = hf.load_hf(path, mesh, axis_rules, heads=("lm",), max_len=max_len)
  if not result.tokenizer_path:
    raise ValueError(f"{path}: a Hugging Face model used for feedback needs its "
                     "tokenizer.json")
  config_path = os.path.join(path, "tokenizer_config.json")
  tokenizer_config = (_read_json(config_path, "tokenizer config")
                      if os.path.isfile(config_path) else {})
  ids = _hf_token_ids(hf.read_config(path), tokenizer_config, result.tokenizer_path)
  tokenizer = tokenizers.JsonTokenizer(result.tokenizer_path, **ids)
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(result.model_config),
                                  ("lm",))
  special = {k: _token_string(tokenizer_config.get(k)) for k in ("bos_token", "eos_token")}
  return LanguageModel(model, result.params, tokenizer,
                       _hf_chat_template(path, tokenizer_config), special, path, "hf")


def load(path: str, *, chat_template_file: str = "", mesh=None, axis_rules=None,
         max_len: int | None = None) -> LanguageModel:
  """Loads an rlhf_jax run's workdir (its latest checkpoint; a PPO run's policy) or a
  Hugging Face directory (its tokenizer.json, token ids and chat template).

  chat_template_file: a Jinja file that replaces the model's chat template.
  mesh / axis_rules: where the params go; default one device, replicated (a run's own
  config.sharding.rules are used for a run). max_len: HF only, default
  max_position_embeddings.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such directory (expected an rlhf_jax run's workdir "
                            "or a Hugging Face model directory)")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{path}: no config.json (expected an rlhf_jax run's workdir or "
                            "a Hugging Face model directory)")
  mesh = mesh or _single_device_mesh()
  # Under `mesh` even when called inside a training loop's own mesh (the RL stage loads
  # its judge there): jit refuses outputs on devices other than the context mesh's.
  with jax.set_mesh(mesh):
    if is_hf_dir(path):
      lm = _load_hf(path, mesh, axis_rules or (), max_len)
    else:
      lm = _load_run(path, mesh, ("lm",))
  if chat_template_file:
    if not os.path.isfile(chat_template_file):
      raise FileNotFoundError(f"chat template {chat_template_file!r}: no such file")
    with open(chat_template_file) as f:
      lm = lm._replace(chat_template=f.read())
  return lm


# ---------------------------------------------------------------------------------------
# Encoding and sampling.

def encode(lm: LanguageModel, texts: Sequence[str], add_bos: bool) -> list[list[int]]:
  """Token ids of each text ([BOS] + ids when `add_bos`)."""
  tok = lm.tokenizer
  return [([tok.bos_id] if add_bos else []) + list(tok.encode(t)) for t in texts]


def check_lengths(lm: LanguageModel, ids: Sequence[Sequence[int]], reserve: int,
                  what: str) -> None:
  """Every sequence plus `reserve` new tokens must fit the model's max_len."""
  limit = lm.max_len - reserve
  for i, row in enumerate(ids):
    if len(row) > limit or not row:
      raise ValueError(f"{what} {i} is {len(row)} tokens; the model ({lm.source}) takes at "
                       f"most max_len={lm.max_len}" + (f" - {reserve} new tokens = {limit}"
                                                        if reserve else "")
                       + " (shorten the template or the texts, or use a longer judge)")


def pad_left(ids: Sequence[Sequence[int]], rows: int, pad_id: int, bucket: int,
             limit: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads `ids` to `[rows, L]` int32 tokens and mask; L is the longest rounded up to a
  multiple of `bucket` (at most `limit`, at least 2); rows past len(ids) repeat the last."""
  longest = max(len(r) for r in ids)
  length = min(max(-(-longest // bucket) * bucket, 2), max(limit, longest))
  tokens = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for i in range(rows):
    row = ids[min(i, len(ids) - 1)]
    tokens[i, length - len(row):] = row
    mask[i, length - len(row):] = 1
  return tokens, mask


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to the first occurrence of any stop string."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
  return text[:cut]


def sample_texts(lm: LanguageModel, texts: Sequence[str], rng: jax.Array, *, add_bos: bool,
                 max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, greedy: bool = False, batch_size: int = 16,
                 bucket: int = 32, stop: Sequence[str] = ()) -> list[str]:
  """One sampled continuation of each text, `batch_size` texts per `sampling.sample` call.

  Batch `i` samples with `fold_in(rng, i)`, so the samples are a function of (rng, texts,
  batch_size). Returns the decoded continuations (no EOS or pads), each cut at the first
  of the `stop` strings.
  """
  if not texts:
    return []
  if batch_size < 1:
    raise ValueError(f"sample_texts: batch_size must be >= 1, got {batch_size}")
  ids = encode(lm, texts, add_bos)
  check_lengths(lm, ids, max_new_tokens, "prompt")
  tok = lm.tokenizer
  options = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                 top_k=int(top_k), top_p=float(top_p), greedy=bool(greedy),
                 eos_id=tok.eos_id, pad_id=tok.pad_id)
  out = []
  for i, start in enumerate(range(0, len(ids), batch_size)):
    chunk = ids[start:start + batch_size]
    tokens, mask = pad_left(chunk, batch_size, tok.pad_id, bucket, lm.max_len - max_new_tokens)
    sample = jax.device_get(sampling.sample(lm.params, lm.model, tokens, mask,
                                            jax.random.fold_in(rng, i), **options))
    for row in range(len(chunk)):
      response = np.asarray(sample.response_tokens[row])
      keep = np.asarray(sample.response_mask[row]) == 1
      out.append(cut_at_stop(tok.decode(response[keep]), stop))
  return out


class Progress:
  """A progress line every `every_s` seconds and at the end: done/total, rate, time left."""

  def __init__(self, what: str, total: int, unit: str, every_s: float = 10.0,
               enabled: bool = True, clock=None):
    self._clock = clock or time.monotonic
    self.what, self.total, self.unit = what, total, unit
    self.every_s, self.enabled = every_s, enabled
    self.start = self._last = self._clock()

  def line(self, done: float) -> str:
    elapsed = max(self._clock() - self.start, 1e-9)
    rate = done / elapsed
    left = (self.total - done) / rate if rate > 0 else float("inf")
    left_text = "?" if left == float("inf") else f"{int(left) // 60}:{int(left) % 60:02d}"
    return (f"{self.what}: {done:.0f}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, "
            f"{left_text} left")

  def update(self, done: float) -> None:
    now = self._clock()
    if self.enabled and (now - self._last >= self.every_s or done >= self.total):
      self._last = now
      print(self.line(done), flush=True)
