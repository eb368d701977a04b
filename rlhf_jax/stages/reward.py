"""Reward modelling: a scalar head on the transformer, Bradley-Terry loss on preference pairs.

The reward of a sequence is the scalar head's output at its last real token
(InstructGPT), or with `config.reward_model.pooling = 'sum'` the sum of the head's outputs
over every real token (a token-level reward model). Chosen and rejected sequences go
through the model in one batched forward pass. `score(model, params, tokens, mask,
pooling) -> [batch]` is the trained reward model as a plain function, for PPO and
evaluation; `pooling_of(run_config)` reads a reward run's pooling.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import tokenizers
from rlhf_jax.data import collate
from rlhf_jax.data import pipeline
from rlhf_jax.data import sources
from rlhf_jax.data import tfds_builders
from rlhf_jax.objectives import bradley_terry
from rlhf_jax.stages import common
from rlhf_jax.train import loop
from rlhf_jax.train import step as step_lib

HEADS = ("scalar",)
POOLINGS = ("last", "sum")


def last_token_index(mask: jax.Array) -> jax.Array:
  """[batch, seq] mask -> [batch] index of the last real token, for either padding side."""
  seq = mask.shape[-1]
  return seq - 1 - jnp.argmax(mask[:, ::-1] != 0, axis=-1)


def check_pooling(pooling: str, field: str = "config.reward_model.pooling") -> None:
  if pooling not in POOLINGS:
    raise ValueError(f"{field}: expected one of {POOLINGS}, got {pooling!r}")


def score(model, params, tokens: jax.Array, mask: jax.Array, pooling: str = "last") -> jax.Array:
  """Rewards [batch] float32 of sequences tokens/mask [batch, seq] (left- or right-padded).

  pooling 'last': the scalar head at the last real token. 'sum': the scalar head summed
  over the real tokens; under causal attention a shared prompt adds the same amount to
  both sequences of a pair, so only the responses decide a comparison.
  """
  check_pooling(pooling)
  positions = common.positions_from_mask(mask)
  outputs, _ = model.apply({"params": params}, tokens, positions, mask)
  if pooling == "sum":
    return jnp.sum(jnp.where(mask != 0, outputs["scalar"], 0.0), axis=-1)
  index = last_token_index(mask)
  return jnp.take_along_axis(outputs["scalar"], index[:, None], axis=-1)[:, 0]


def pooling_of(run_config) -> str:
  """The pooling of a reward run from its (dict or ConfigDict) config; 'last' if unset.

  Runs saved before the section was named `reward_model` have it under `reward`."""
  section = run_config.get("reward_model") or run_config.get("reward") or {}
  return dict(section).get("pooling", "last")


def pair_rewards(model, params, batch: dict, pooling: str = "last") -> tuple[jax.Array, jax.Array]:
  """(r_chosen, r_rejected) [batch] from one forward pass over the stacked pairs."""
  tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  rewards = score(model, params, tokens, mask, pooling)
  n = batch["chosen_tokens"].shape[0]
  return rewards[:n], rewards[n:]


# Per-pair float columns a record may carry into its example: gold scores (testbed
# datasets) and precomputed reference log-probs (`config.preference.reference = "precompute"`).
PASSED_COLUMNS = ("chosen_score", "rejected_score", "reference_chosen_logps",
                  "reference_rejected_logps")


def preference_transform(tokenizer, seq_len: int):
  """Record -> preference example, carrying the record's `PASSED_COLUMNS`."""
  base = collate.make_transform("preference", tokenizer, seq_len=seq_len)

  def transform(record):
    example = base(record)
    if example is not None:
      for k in PASSED_COLUMNS:
        if k in record:
          example[k] = np.asarray(record[k], np.float32)
    return example
  return transform


def preference_splits(config: ml_collections.ConfigDict, workdir: str):
  """(splits {'train', 'test'} of records, record -> example transform, source stats, the
  prepared dataset's directory)."""
  dataset_dir, stats = sources.preferences(config.data, common.data_dir(config, workdir))
  splits = tfds_builders.load(dataset_dir, kind="preference")
  splits["train"] = pipeline.Head(splits["train"], config.data.max_train_records)
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  return splits, preference_transform(tokenizer, config.data.seq_len), stats, dataset_dir


def make_preference_data(config: ml_collections.ConfigDict, workdir: str,
                         splits_fn=preference_splits) -> loop.Data:
  """Preference pairs for the reward and DPO stages; pairs that do not fit are counted.

  `splits_fn(config, workdir)` gives the splits and transform (the DPO stage adds
  columns to the records through it)."""
  splits, transform, stats, _ = splits_fn(config, workdir)
  train = pipeline.make_train_iterator(splits["train"], transform, config.data.batch_size,
                                       config.seed, jax.process_index(), jax.process_count())

  @functools.cache
  def eval_batches():
    batches, eval_stats = pipeline.make_eval_batches(
        splits["test"], transform, config.data.eval_batch_size, config.train.eval_batches or None,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    stats.update({f"eval_{k}": v for k, v in eval_stats.items()})
    return batches

  # Pairs that do not fit seq_len are counted over the whole train split up front.
  stats = dict(stats, train_pairs=len(splits["train"]),
               train_pairs_too_long=sum(transform(splits["train"][i]) is None
                                        for i in range(len(splits["train"]))))
  return loop.Data(train=train, eval=eval_batches, stats=stats)


def make_data(config, workdir):
  def splits_fn(config, workdir):
    splits = preference_splits(config, workdir)
    check_soft_targets(config, splits[-1])
    return splits
  return make_preference_data(config, workdir, splits_fn)


def init(config, rng, mesh):
  """The reward model from `config.init`; with `config.reward_model.zero_head` its scalar head
  starts at 0, so every reward starts at 0 (a summed random head would start at +-10)."""
  check_pooling(config.reward_model.pooling)
  state = common.init_state(config, common.make_model(config, HEADS), rng, mesh)
  if not config.reward_model.zero_head:
    return state
  return state.replace(params=common.zero_scalar_head(state.params))


def loss_terms(rm, model, params, batch, weights=None):
  """((loss, metrics), (r_chosen, r_rejected) [batch]): the Bradley-Terry loss of the
  `config.reward_model` section `rm` (pooling, margin, label smoothing, centring, soft
  targets) on one batch of pairs; `weights` `[batch]` (an eval batch's `valid`) drop rows.
  The train step and evaluation both call this."""
  r_chosen, r_rejected = pair_rewards(model, params, batch, rm.pooling)
  if rm.soft_targets:   # `margin` holds the AI judge's log-odds (check_soft_targets)
    return bradley_terry.soft_bradley_terry_loss(
        r_chosen, r_rejected, jax.nn.sigmoid(batch["margin"]), center_coef=rm.center_coef,
        weights=weights), (r_chosen, r_rejected)
  return bradley_terry.bradley_terry_loss(
      r_chosen, r_rejected, margin=batch["margin"] if rm.use_margin else None,
      label_smoothing=rm.label_smoothing, center_coef=rm.center_coef,
      weights=weights), (r_chosen, r_rejected)


def check_soft_targets(config: ml_collections.ConfigDict, dataset_dir: str) -> None:
  """Soft targets read the pairs' `margin` as log-odds: only an AI-labelled dataset (or a
  file the user filled with log-odds) has them, and they replace margin and smoothing."""
  rm = config.reward_model
  if not rm.soft_targets:
    return
  if rm.use_margin or rm.label_smoothing:
    raise ValueError("config.reward_model.soft_targets: the targets replace use_margin and "
                     "label_smoothing; turn those off")
  kind = tfds_builders.read_metadata(dataset_dir).get("margin")
  if config.data.source == "dataset" and kind != "judge_log_odds":
    raise ValueError(f"config.reward_model.soft_targets: {dataset_dir} has no judge log-odds "
                     f"in its margin column (metadata margin={kind!r}); label it with "
                     "experiments.label_preferences --labeler=ai")


def make_step(config):
  model = common.make_model(config, HEADS)

  def loss_fn(params, extras, batch, rng):
    del extras, rng
    (loss, metrics), _ = loss_terms(config.reward_model, model, params, batch)
    return loss, metrics

  return step_lib.make_train_step(loss_fn, config)


@functools.cache
def _eval_step(model, rm: ml_collections.FrozenConfigDict):
  @jax.jit
  def eval_step(state, batch):
    (_, metrics), (r_chosen, r_rejected) = loss_terms(rm, model, state.params, batch,
                                                      batch["valid"])
    return (dict(metrics, weight=jnp.sum(batch["valid"])),
            {"r_chosen": r_chosen, "r_rejected": r_rejected})
  return eval_step


GOLD_COLUMNS = ("chosen_score", "rejected_score")


def gold_metrics(reward_margin: np.ndarray, rows: dict, clear_gap: float | None = None) -> dict:
  """The fraction of pairs whose reward margin `[pairs]` has the sign of their gold margin
  (testbed pairs: `rows` has the gold scores; {} otherwise); with `clear_gap`, also on the
  clear pairs (gold gap > `clear_gap`) and their fraction."""
  if GOLD_COLUMNS[0] not in rows:
    return {}
  gold = (rows["chosen_score"] - rows["rejected_score"]).astype(np.float64)
  agree = reward_margin * gold > 0
  metrics = {"gold_agreement": float(np.mean(agree))}
  if clear_gap is not None:
    clear = np.abs(gold) > clear_gap
    metrics.update(
        gold_agreement_clear=float(np.mean(agree[clear])) if clear.any() else float("nan"),
        clear_pair_fraction=float(np.mean(clear)))
  return metrics


def evaluate(config, state, data, mesh, rng):
  """Held-out loss (the training loss: margin, label smoothing, centring), accuracy,
  rewards and margin, averaged over the real pairs; gold agreement on testbed pairs."""
  del rng
  eval_step = _eval_step(common.make_model(config, HEADS),
                         ml_collections.FrozenConfigDict(config.reward_model))
  metrics, rows = common.evaluate_batches(eval_step, state, data.eval(), mesh, GOLD_COLUMNS)
  margin = rows["r_chosen"].astype(np.float64) - rows["r_rejected"]
  metrics["num_pairs"] = len(margin)
  metrics.update(gold_metrics(margin, rows, config.reward_model.clear_gold_gap))
  return metrics
