"""What every stage builds the same way: the model, its sharded params and train state, evaluation over batches."""

import os
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax.model import sampling
from rlhf_jax.model import transformer
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import optimizer as optimizer_lib
from rlhf_jax.train import sharding as sharding_lib
from rlhf_jax.train import state as state_lib


def make_model(config: ml_collections.ConfigDict, heads=("lm",)) -> transformer.Transformer:
  return transformer.Transformer(transformer.TransformerConfig.from_dict(config.model), heads=heads)


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.data_dir or os.path.join(workdir, "data")


def init_state(config: ml_collections.ConfigDict, model: transformer.Transformer, rng: jax.Array,
               mesh, extras_fn: Callable[[Any], dict] | None = None) -> state_lib.TrainState:
  """A sharded TrainState for `model`, its params optionally from `config.init`.

  `extras_fn(params) -> dict` builds frozen extras from the (possibly loaded)
  params, e.g. `lambda p: {'reference': p}` for a frozen reference policy.
  """
  tx = optimizer_lib.make_optimizer(config.optimizer, config.train.num_steps).tx
  axis_rules = sharding_lib.rules(config)

  def init_fn(r):
    params = transformer.init_params(model, r)
    extras = extras_fn(params) if extras_fn else {}
    return state_lib.TrainState.create(params=params, tx=tx, extras=extras)

  state, _ = sharding_lib.init_sharded(init_fn, rng, mesh, axis_rules)
  params = load_initial_params(config, state.params)
  if params is not state.params:
    extras = extras_fn(params) if extras_fn else {}
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t))   # extras own their buffers (donation)
    state = state.replace(params=params, extras=copy(extras))
  return state


def zero_scalar_head(params: dict) -> dict:
  """`params` with its 'scalar_head' zeroed (same shardings): rewards and values start at 0."""
  head = jax.jit(lambda h: jax.tree.map(jnp.zeros_like, h),
                 out_shardings=sharding_lib.shardings_of(params["scalar_head"]))
  return dict(params, scalar_head=head(params["scalar_head"]))


def load_initial_params(config: ml_collections.ConfigDict, params: Any) -> Any:
  """Params from `config.init.checkpoint` / `config.init.hf_dir` merged onto `params`."""
  if config.init.checkpoint and config.init.hf_dir:
    raise ValueError("config.init: set checkpoint or hf_dir, not both")
  if config.init.checkpoint:
    return checkpoint_lib.load_params(config.init.checkpoint, params)
  if config.init.hf_dir:
    from rlhf_jax.interop import hf  # optional dependency path
    return hf.load_params_into(config.init.hf_dir, params)
  return params


def evaluate_batches(eval_step: Callable, state, batches: Iterable[dict], mesh,
                     columns: tuple[str, ...] = ()) -> tuple[dict, dict]:
  """Runs the jitted `eval_step(state, batch) -> (metrics, rows)` over held-out batches.

  `metrics` are scalars averaged over the batch's real rows, with a `weight` (tokens or
  examples they average over): returned as their weighted mean over batches. `rows` are
  per-example `[batch]` outputs: returned on the host, concatenated over batches, with the
  batch's own `columns` (e.g. gold scores) beside them, valid rows only.
  """
  totals: dict = {}
  total_weight = 0.0
  gathered: dict = {}
  for batch in batches:
    batch = sharding_lib.put_batch(batch, mesh)   # multi-host: gather outputs and columns alike
    metrics, rows = eval_step(state, batch)
    metrics = jax.device_get(metrics)
    weight = float(metrics.pop("weight"))
    total_weight += weight
    for k, v in metrics.items():
      totals[k] = totals.get(k, 0.0) + float(v) * weight
    carried = {k: batch[k] for k in (*columns, "valid") if k in batch}
    for k, v in sharding_lib.to_host(dict(rows, **carried) if rows else {}).items():
      gathered.setdefault(k, []).append(np.asarray(v))
  if total_weight == 0:
    raise ValueError("evaluation saw no examples: the eval split is empty or every example was filtered")
  rows = {k: np.concatenate(v) for k, v in gathered.items()}
  if rows:
    valid = rows.pop("valid") == 1
    rows = {k: v[valid] for k, v in rows.items()}
  return {k: v / total_weight for k, v in totals.items()}, rows


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """[batch, seq] mask -> positions counting real tokens from 0, for either padding side.

  The sampler's formula (`sampling.prompt_positions`): one definition of positions.
  """
  return sampling.prompt_positions(mask)
