"""Supervised fine-tuning: next-token cross-entropy on response tokens only.

Pretraining (stages/pretrain.py) is the same stage on plain text, with every
token a target.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from rlhf_jax import tokenizers
from rlhf_jax.data import collate
from rlhf_jax.data import pipeline
from rlhf_jax.data import sources
from rlhf_jax.data import tfds_builders
from rlhf_jax.objectives import sft as sft_objective
from rlhf_jax.stages import common
from rlhf_jax.train import loop
from rlhf_jax.train import step as step_lib

DATA_KIND = "demonstration"


def make_lm_data(config: ml_collections.ConfigDict, workdir: str, kind: str) -> loop.Data:
  """Train iterator and eval batches of LM examples ({tokens, mask, loss_mask})."""
  prepare = {"demonstration": sources.demonstrations, "text": sources.texts}[kind]
  dataset_dir, stats = prepare(config.data, common.data_dir(config, workdir))
  splits = tfds_builders.load(dataset_dir, kind=kind)
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  transform = collate.make_transform(kind, tokenizer, seq_len=config.data.seq_len)
  train = pipeline.make_train_iterator(splits["train"], transform, config.data.batch_size,
                                       config.seed, jax.process_index(), jax.process_count())
  eval_batches = functools.cache(lambda: pipeline.make_eval_batches(
      splits["test"], transform, config.data.eval_batch_size, config.train.eval_batches,
      shard_index=jax.process_index(), shard_count=jax.process_count())[0])
  return loop.Data(train=train, eval=eval_batches, stats=stats)


def make_data(config, workdir):
  return make_lm_data(config, workdir, DATA_KIND)


def init(config, rng, mesh):
  return common.init_state(config, common.make_model(config), rng, mesh)


def logits_fn(model, params, batch):
  """[batch, seq, vocab] logits of a right-padded LM batch."""
  positions = common.positions_from_mask(batch["mask"])
  outputs, _ = model.apply({"params": params}, batch["tokens"], positions, batch["mask"])
  return outputs["logits"]


def loss_and_metrics(model, params, batch, weights=None):
  """`sft_objective.sft_loss` of a right-padded LM batch: the targets are `loss_mask`'s
  (response tokens; every token for pretraining). `weights` `[batch]` (an eval batch's
  `valid`) drop rows. The train step and evaluation both call this."""
  loss_mask = batch["loss_mask"] if weights is None else batch["loss_mask"] * weights[:, None]
  return sft_objective.sft_loss(logits_fn(model, params, batch), batch["tokens"], loss_mask)


def make_step(config):
  model = common.make_model(config)

  def loss_fn(params, extras, batch, rng):
    del extras, rng
    return loss_and_metrics(model, params, batch)

  return step_lib.make_train_step(loss_fn, config)


@functools.cache
def _eval_step(model):
  @jax.jit
  def eval_step(state, batch):
    _, metrics = loss_and_metrics(model, state.params, batch, batch["valid"])
    weight = metrics.pop("num_target_tokens")
    return dict(metrics, weight=weight), {}
  return eval_step


def evaluate(config, state, data, mesh, rng):
  """Token-level eval loss, accuracy and perplexity over the held-out split."""
  del rng
  metrics, _ = common.evaluate_batches(_eval_step(common.make_model(config)), state,
                                       data.eval(), mesh)
  metrics["perplexity"] = float(jnp.exp(metrics["loss"]))
  return metrics
