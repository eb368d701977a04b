"""Reward stage: the reward is read at the last real token; the loss is the formula's, in
training and evaluation alike; gold agreement by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import reward as reward_config
from rlhf_jax.data import sources
from rlhf_jax.stages import common
from rlhf_jax.stages import reward
from rlhf_jax.train import loop
from rlhf_jax.train import sharding as sharding_lib
from tests.stages.pairs import pair_config


# Cheaper compiles for these tiny programs, each run once or twice.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
  """jax.jit(fn) compiled for the shapes of `args` with FAST_COMPILE."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


@functools.cache
def _initial_params(model):
  """The model's unboxed params from key 1, compiled once per model (the tests share it)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  args = (jax.random.key(1), tokens, tokens, jnp.ones_like(tokens))
  params = _compiled(model.init, *args)(*args)["params"]
  return jax.tree.map(lambda x: getattr(x, "value", x), params,
                      is_leaf=lambda x: hasattr(x, "value"))


def _model_and_params(config):
  model = common.make_model(config, reward.HEADS)
  return model, _initial_params(model)


SEQS = [[1, 40, 50, 60, 70, 2], [1, 80, 90, 2]]


def _padded_both_sides(seqs, length):
  """[len(seqs), length] int32 right- and left-padded copies of `seqs`."""
  right = np.zeros((len(seqs), length), np.int32)
  left = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    right[i, :len(s)] = s
    left[i, length - len(s):] = s
  return right, left


def _score(model, params, padded, pooling="last"):
  """reward.score of padded tokens [batch, seq] (mask: tokens != 0), compiled."""
  tokens, mask = jnp.asarray(padded), jnp.asarray(padded != 0, jnp.int32)
  return _score_fn(model, pooling, tokens.shape)(params, tokens, mask)


@functools.cache
def _score_fn(model, pooling, shape):
  tokens = jnp.zeros(shape, jnp.int32)
  return _compiled(lambda p, t, m: reward.score(model, p, t, m, pooling),
                   _initial_params(model), tokens, tokens)


@functools.cache
def _unpadded_scalars_fn(model, length):
  """Compiled (params, tokens [1, length]) -> the scalar head [1, length] of one unpadded
  sequence (positions 0, 1, ...)."""
  fn = lambda p, t: model.apply({"params": p}, t, jnp.arange(length)[None],
                                jnp.ones_like(t))[0]["scalar"]
  return _compiled(fn, _initial_params(model), jnp.zeros((1, length), jnp.int32))


def _unpadded_scalars(model, params, seq):
  """The scalar head [len(seq)] of one unpadded sequence."""
  return np.asarray(_unpadded_scalars_fn(model, len(seq))(params, jnp.asarray([seq]))[0])


def test_reward_read_at_last_real_token_either_padding_side(tmp_path):
  config = pair_config(reward_config, tmp_path)
  model, params = _model_and_params(config)
  right, left = _padded_both_sides(SEQS, length=9)
  r_right, r_left = _score(model, params, right), _score(model, params, left)
  for i, s in enumerate(SEQS):   # unpadded, one sequence at a time
    last = _unpadded_scalars(model, params, s)[-1]
    np.testing.assert_allclose(r_right[i], last, atol=1e-5)
    np.testing.assert_allclose(r_left[i], last, atol=1e-5)
  assert abs(float(r_right[0] - r_right[1])) > 1e-4     # the two rewards do differ


def test_sum_pooling_sums_the_token_scalars_of_real_tokens_only(tmp_path):
  config = pair_config(reward_config, tmp_path)
  model, params = _model_and_params(config)
  right, left = _padded_both_sides(SEQS, length=9)
  for padded in (right, left):
    rewards = _score(model, params, padded, pooling="sum")
    for i, s in enumerate(SEQS):
      out = _unpadded_scalars(model, params, s)
      np.testing.assert_allclose(rewards[i], np.sum(np.asarray(out, np.float64)),
                                 rtol=1e-5, atol=1e-5)


def test_zero_head_starts_every_reward_at_zero_and_bad_pooling_is_named(tmp_path):
  config = pair_config(reward_config, tmp_path)
  config.reward_model.pooling = "sum"
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  state = reward.init(config, jax.random.key(0), mesh)
  model = common.make_model(config, reward.HEADS)
  tokens = jnp.asarray([[1, 40, 50, 2], [1, 60, 2, 0]])
  np.testing.assert_array_equal(reward.score(model, state.params, tokens, (tokens != 0)
                                             .astype(jnp.int32), "sum"), 0.0)
  assert np.any(np.asarray(state.params["embed"]["embedding"]) != 0)   # only the head is zeroed
  config.reward_model.pooling = "mean"
  with pytest.raises(ValueError, match="config.reward_model.pooling"):
    reward.init(config, jax.random.key(0), mesh)


def _stage_loss(tmp_path, margins, **reward_model):
  """The stage's loss on its first train batch with `margin` = linspace(*margins), and
  (r_chosen, r_rejected, margin) as float64."""
  config = pair_config(reward_config, tmp_path)
  config.reward_model.update(**reward_model)
  model, params = _model_and_params(config)
  data = reward.make_data(config, str(tmp_path))
  batch = {k: jnp.asarray(v) for k, v in next(data.train).items()}
  batch["margin"] = jnp.linspace(*margins, batch["margin"].shape[0])
  (loss, _), (rc, rr) = reward.loss_terms(config.reward_model, model, params, batch)
  return float(loss), tuple(np.asarray(x, np.float64) for x in (rc, rr, batch["margin"]))


def test_stage_loss_is_bradley_terry_with_margin_and_centring(tmp_path):
  loss, (rc, rr, m) = _stage_loss(tmp_path, (0.0, 1.0), use_margin=True, center_coef=0.3)
  expected = np.mean(np.log1p(np.exp(-(rc - rr - m))) + 0.3 * (rc + rr) ** 2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_soft_targets_are_the_judges_probabilities(tmp_path):
  """RLAIF soft labels: -[p log s(d) + (1 - p) log s(-d)], p = sigmoid(margin) (the log-odds)."""
  loss, (rc, rr, m) = _stage_loss(tmp_path, (-2.0, 3.0), soft_targets=True, center_coef=0.3)
  p, d = 1 / (1 + np.exp(-m)), rc - rr
  expected = np.mean(p * np.log1p(np.exp(-d)) + (1 - p) * np.log1p(np.exp(d))
                     + 0.3 * (rc + rr) ** 2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_soft_targets_need_log_odds_and_no_margin_or_smoothing(tmp_path):
  config = pair_config(reward_config, tmp_path)
  config.reward_model.update(soft_targets=True, label_smoothing=0.1)
  with pytest.raises(ValueError, match="config.reward_model.soft_targets: .*label_smoothing"):
    reward.make_data(config, str(tmp_path))
  dataset_dir, _ = sources.preferences(config.data, str(tmp_path / "data"))   # simulated-like:
  config.reward_model.label_smoothing = 0.0                               # margins, no log-odds
  config.data.update(source="dataset", dataset_dir=dataset_dir)
  with pytest.raises(ValueError, match="no judge log-odds"):
    reward.make_data(config, str(tmp_path))


def test_reward_model_learns_pairs_and_counts(tmp_path):
  config = pair_config(reward_config, tmp_path, num_steps=40)
  config.optimizer.learning_rate = 3e-3
  metrics = loop.train(config, str(tmp_path / "run"), reward)
  assert metrics["num_pairs"] == 5       # 10% of 48 pairs held out
  assert metrics["accuracy"] == 1.0 and metrics["loss"] < 0.3


def _one_device_mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def _trained_state(config, tmp_path, mesh):
  """A reward model one step away from its zero head (so rewards differ), a batch, and the
  jitted step (compiled once, reused by the caller)."""
  config.reward_model.zero_head = False
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
  data = reward.make_data(config, str(tmp_path))
  batches = [dict(next(data.train), valid=np.ones(8, np.int32)) for _ in range(2)]
  state = reward.init(config, jax.random.key(0), mesh)
  step = jax.jit(reward.make_step(config))
  state, _ = step(state, batches[0], jax.random.key(1))
  return state, batches[1], step


def test_evaluation_reports_the_training_loss_with_smoothing_margin_and_centring(tmp_path):
  config = pair_config(reward_config, tmp_path)
  config.reward_model.update(use_margin=True, label_smoothing=0.2, center_coef=0.3)
  mesh = _one_device_mesh()
  with jax.set_mesh(mesh):
    state, batch, step = _trained_state(config, tmp_path, mesh)
    batch["margin"] = np.linspace(0.0, 1.0, 8).astype(np.float32)
    _, train = step(state, batch, jax.random.key(2))
    evaluated = reward.evaluate(config, state, loop.Data(train=None, eval=lambda: [batch]), mesh,
                                None)
  for k in ("loss", "accuracy", "reward_chosen", "reward_rejected", "margin"):
    np.testing.assert_allclose(evaluated[k], train[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # Not the plain Bradley-Terry value: smoothing, margin and centring are in it.
  model = common.make_model(config, reward.HEADS)
  rc, rr = (np.asarray(r, np.float64) for r in reward.pair_rewards(
      model, state.params, {k: jnp.asarray(v) for k, v in batch.items()}, "last"))
  d = rc - rr - batch["margin"]
  expected = np.mean(0.8 * np.logaddexp(0, -d) + 0.2 * np.logaddexp(0, d)) + 0.3 * np.mean(
      (rc + rr) ** 2)
  np.testing.assert_allclose(evaluated["loss"], expected, rtol=1e-5)
  assert abs(evaluated["loss"] - np.mean(np.logaddexp(0, -(rc - rr)))) > 1e-3


def test_gold_agreement_by_hand(tmp_path):
  config = pair_config(reward_config, tmp_path)
  config.reward_model.clear_gold_gap = 0.5
  mesh = _one_device_mesh()
  with jax.set_mesh(mesh):
    state, batch, _ = _trained_state(config, tmp_path, mesh)
    model = common.make_model(config, reward.HEADS)
    rc, rr = (np.asarray(r) for r in reward.pair_rewards(
        model, state.params, {k: jnp.asarray(v) for k, v in batch.items()}, "last"))
    sign = np.sign(rc - rr)
    assert np.all(sign != 0)
    # Gold margins that agree with the model's on pairs 0-4 and disagree on 5-6; pair 7
    # is padding (valid 0), which must not count. Pairs 0, 1, 5 have a clear gap (> 0.5).
    gap = np.array([2.0, 1.0, 0.1, 0.2, 0.3, 0.9, 0.4, 5.0], np.float32)
    agrees = np.array([1, 1, 1, 1, 1, -1, -1, -1])
    batch["rejected_score"] = np.zeros(8, np.float32)
    batch["chosen_score"] = (sign * agrees * gap).astype(np.float32)
    batch["valid"] = np.array([1] * 7 + [0], np.int32)
    metrics = reward.evaluate(config, state, loop.Data(train=None, eval=lambda: [batch]), mesh,
                              None)
  assert metrics["num_pairs"] == 7
  np.testing.assert_allclose(metrics["gold_agreement"], 5 / 7)
  np.testing.assert_allclose(metrics["gold_agreement_clear"], 2 / 3)
  np.testing.assert_allclose(metrics["clear_pair_fraction"], 3 / 7)
