"""Tiny feedback models for the tests: random params large enough that the judge's logits
differ between options, a byte tokenizer, and the rlhf_jax run / HF directory layouts."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from rlhf_jax import tokenizers
from rlhf_jax.feedback import models
from rlhf_jax.model import transformer as tr
from rlhf_jax.train import checkpoint as checkpoint_lib

MODEL = dict(base.model_config("tiny").to_dict(), vocab_size=264, embed_dim=32, num_layers=2,
             num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, max_len=512)


def random_params(model_config, seed=0, scale=0.3):
  """Every leaf random (norm scales near 1), so every tensor matters."""
  model = tr.Transformer(tr.TransformerConfig.from_dict(model_config), ("lm",))
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens, tokens, tokens)["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape)
    return jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + scale * noise, leaf.dtype)

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def byte_lm(seed=0, **overrides):
  model, params = random_params(dict(MODEL, **overrides), seed)
  return models.LanguageModel(model, params, tokenizers.ByteTokenizer(), "", {}, "<tiny>", "run")


def write_run(workdir, seed=0):
  """An rlhf_jax run's workdir: config.json and a checkpoint holding {'params'}."""
  model, params = random_params(MODEL, seed)
  config = base.get_config()
  config.model.update(MODEL)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  mngr = checkpoint_lib.manager(workdir, keep=1)
  checkpoint_lib.save(mngr, 1, {"params": params}, {})
  mngr.close()
  return model, params


def byte_ids(text, bos=True):
  return ([1] if bos else []) + [b + 3 for b in text.encode("utf-8")]


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def full_forward_last_logits(model, params, ids, length=256):
  """Logits [V] after `ids`: one right-padded sequence, no cache, positions 0.. (causal
  attention: the padding after the last real token cannot change its logits). The
  reference computation, jitted once per length."""
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(ids)] = ids
  positions = np.arange(length, dtype=np.int32)[None]
  mask = (positions < len(ids)).astype(np.int32)
  logits = _apply(model, params, tokens, positions, mask)
  return np.asarray(logits[0, len(ids) - 1], np.float64)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, positions, mask):
  return model.apply({"params": params}, tokens, positions, mask)[0]["logits"]
