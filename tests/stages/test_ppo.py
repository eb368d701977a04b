"""PPO / RLOO / GRPO / online DPO stage: rollout log-probs against a NumPy forward pass,
first-step ratios and KL, advantages against NumPy formulas, bad rewards, registered text
rewards in the loop and in evaluation, frozen params, sharding."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import grpo as grpo_config
from configs import ppo as ppo_config
from configs import rloo as rloo_config
from rlhf_jax.model import transformer
from rlhf_jax.model import sampling
from rlhf_jax.rl import algorithms
from rlhf_jax.rl import models as models_lib
from rlhf_jax.rl import rewards
from rlhf_jax.rl import rollout as rollout_lib
from rlhf_jax.stages import ppo
from rlhf_jax.stages import reward as reward_lib
from rlhf_jax.testbed import gold_reward   # registers the text reward "gold"
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import loop
from rlhf_jax.train import sharding as sharding_lib

# A reward model smaller than the policy: its architecture comes from its config.json.
RM_MODEL = dict(embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                mlp_dim=64, max_len=64)


class RecordedGold:
  """A user text reward: the gold reward, recording the texts of every call; from call
  `nan_after + 1` on it returns NaN."""

  def __init__(self):
    self.calls, self.nan_after = [], None

  def __call__(self, texts):
    self.calls.append(list(texts))
    if self.nan_after is not None and len(self.calls) > self.nan_after:
      return np.full(len(texts), np.nan, np.float32)
    return gold_reward.gold_reward(texts)


RECORDED_GOLD = RecordedGold()
rewards.register_text_reward("recorded_gold", RECORDED_GOLD)
rewards.register_text_reward("two_columns", lambda texts: np.zeros((len(texts), 2)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("ppo")
  rm_dir = str(root / "rm")
  config = ppo_config.get_config()
  config.stage = "reward"
  config.model.update(RM_MODEL)
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(config.model),
                                  heads=reward_lib.HEADS)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(7), dummy, dummy, jnp.ones((1, 4), jnp.int32))
  params = jax.tree.map(lambda p: p + 0.0, nn.meta.unbox(params["params"]))
  # A non-zero head so that scores differ between responses.
  params["scalar_head"]["kernel"] = params["scalar_head"]["kernel"] * 50.0
  loop.write_config(config, rm_dir)
  saved = {"step": jnp.zeros((), jnp.int32), "params": params}
  checkpoint_lib.save(checkpoint_lib.manager(rm_dir, 1), 1, saved, {})
  return {"rm": rm_dir, "data": str(root / "data"), "root": root}


def tiny_config(dirs, base=ppo_config, **rl_fields):
  """A tiny config of `base`; `rl_fields` go to config.rl, max_new_tokens and temperature to
  config.sampling."""
  c = base.get_config()
  c.model = ppo_config.base.model_config("tiny")
  c.model.update(num_layers=1, max_len=32)
  c.data.update(corpus_train=300, corpus_test=40, prompt_len=16, eval_batch_size=8,
                data_dir=dirs["data"])
  if c.rl.samples_per_prompt == 1:
    c.data.batch_size = 8
  else:
    c.rl.samples_per_prompt, c.data.batch_size = 2, 4
  c.rl.update(epochs=2, num_minibatches=2, reward_checkpoint=dirs["rm"])
  c.sampling.update(max_new_tokens=8, temperature=0.7)
  sampling_fields = {k: rl_fields.pop(k) for k in ("max_new_tokens", "temperature")
                     if k in rl_fields}
  c.rl.update(**rl_fields)
  c.sampling.update(**sampling_fields)
  c.train.update(num_steps=2, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=0)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=0)
  return c


def first_iteration_config(dirs):
  """One epoch of one minibatch (the first update sees the rollout's own policy), adaptive KL."""
  return tiny_config(dirs, epochs=1, num_minibatches=1, adaptive_kl=True, kl_target=2.0,
                     kl_horizon=100)


_COMPILED = {}   # (config, devices) -> (mesh, initial state, compiled step): once per module
# Cheaper compiles for these tiny programs (the same options for every run compared).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiled(config, num_devices=1):
  key = (config.to_json(), num_devices)
  if key not in _COMPILED:
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:num_devices])
    batch = next(ppo.make_data(config, config.data.data_dir).train)
    with jax.set_mesh(mesh):
      state = ppo.init(config, jax.random.key(0), mesh)
      shardings = sharding_lib.shardings_of(state)
      step = jax.jit(ppo.make_step(config), in_shardings=(
          shardings, sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)),
                     out_shardings=(shardings, sharding_lib.replicated(mesh)),
                     donate_argnums=(0,))   # as the loop does
      step = step.lower(state, sharding_lib.put_batch(batch, mesh),
                        jax.random.key(0)).compile(FAST_COMPILE)
    _COMPILED[key] = mesh, state, step
  return _COMPILED[key]


def run(config, num_steps, num_devices=1, state=None):
  """Iterations from the initial state (or `state`): (metrics per step, final state)."""
  mesh, initial, step = compiled(config, num_devices)
  state = jax.tree.map(jnp.copy, initial if state is None else state)   # the step donates it
  data = ppo.make_data(config, config.data.data_dir)
  history = []
  with jax.set_mesh(mesh):
    for i in range(num_steps):
      state, metrics = step(state, sharding_lib.put_batch(next(data.train), mesh),
                            jax.random.key(i))
      history.append(jax.device_get(metrics))
  return history, state


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_rollout_pieces_equal_a_numpy_forward_pass(dirs):
  """The rollout's log-probs (sampler and recomputed), values and scores, from one sample."""
  config = first_iteration_config(dirs)
  _, state, _ = compiled(config)
  models = models_lib.make_models(config)
  assert models.reward.config.embed_dim == RM_MODEL["embed_dim"]   # from the RM's config.json
  assert models.critic.config == models.reward.config               # critic initialised from the RM
  batch = next(ppo.make_data(config, config.data.data_dir).train)
  p, n, temperature = (config.data.prompt_len, config.sampling.max_new_tokens,
                       config.sampling.temperature)

  def pieces(params, extras, prompt_tokens, prompt_mask, rng):
    """rollout_lib.rollout's pieces (sample, policy and critic outputs, scores), compiled."""
    sample = sampling.sample(params["policy"], models.policy, prompt_tokens, prompt_mask, rng,
                             max_new_tokens=n, temperature=temperature, eos_id=2, pad_id=0)
    policy = rollout_lib.response_outputs(models.policy, params["policy"], sample.tokens,
                                          sample.mask, p, temperature)
    critic = rollout_lib.response_outputs(models.critic, params["critic"], sample.tokens,
                                          sample.mask, p)
    return sample, policy, critic, rewards.model_reward_fn(models.reward)(extras, sample)

  args = (state.params, state.extras, batch["prompt_tokens"], batch["prompt_mask"],
          jax.random.key(1))
  sample, policy, critic, scores = jax.device_get(
      jax.jit(pieces).lower(*args).compile(FAST_COMPILE)(*args))

  tokens, mask = sample.tokens, sample.mask
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)

  def apply(model, params):   # the full forward pass, compiled with the same options
    fn = lambda params: model.apply({"params": params}, tokens, positions, mask)[0]
    return jax.device_get(jax.jit(fn).lower(params).compile(FAST_COMPILE)(params))
  logits = np.asarray(apply(models.reference, state.extras["reference"])["logits"], np.float64)
  # Response token t is predicted at position p - 1 + t.
  logp = log_softmax(logits[:, p - 1:p - 1 + n] / temperature)
  expected = np.take_along_axis(logp, tokens[:, p:, None], -1)[..., 0]
  real = sample.response_mask == 1
  assert real.sum() > 0
  np.testing.assert_allclose(policy["logprobs"][real], expected[real], atol=2e-5)
  np.testing.assert_allclose(sample.logprobs[real], expected[real], atol=2e-5)
  # Values: the critic's scalar head at the same positions (the state before token t).
  values = apply(models.critic, state.params["critic"])["scalar"][:, p - 1:p - 1 + n]
  np.testing.assert_allclose(critic["values"], values, atol=1e-6)
  # The score: the reward model's scalar head at the last real token.
  rm = apply(models.reward, state.extras["reward"])["scalar"]
  last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  np.testing.assert_allclose(scores, rm[np.arange(len(last)), last], atol=1e-5)
  assert np.std(scores) > 1e-3


def test_first_iteration_ratio_one_kl_zero_frozen_params(dirs):
  config = first_iteration_config(dirs)
  _, state, _ = compiled(config)
  before = jax.device_get({"reference": state.extras["reference"], "reward": state.extras["reward"],
                           "policy": state.params["policy"]})
  history, state = run(config, 2)
  first = history[0]
  # Rollout log-probs come from the training forward pass: the first ratio is exactly 1.
  assert first["ratio"] == pytest.approx(1.0, abs=1e-6)
  assert first["clipfrac"] == 0.0
  assert abs(first["approx_kl"]) < 1e-7
  assert first["sampler_logprob_diff"] < 2e-5
  # Policy == reference at the first rollout: no KL, and the RLHF reward is the score.
  assert first["kl"] == 0.0
  assert first["rlhf_reward"] == pytest.approx(first["score"], abs=1e-6)
  # Ziegler's controller: e = clip(0 / 2 - 1, -0.2, 0.2) = -0.2; beta (1 + e * 8 / 100).
  beta = config.rl.kl_coef
  assert first["kl_coef"] == pytest.approx(beta)
  assert history[1]["kl_coef"] == pytest.approx(beta * (1 - 0.2 * 8 / 100), rel=1e-6)
  assert history[1]["kl"] != 0.0                        # the policy moved
  for m in history:
    for k in ("loss", "score", "entropy", "value_loss", "explained_variance", "response_length",
              "no_eos_fraction", "grad_norm"):
      assert np.isfinite(m[k]), k
  after = jax.device_get(state)
  for name in ("reference", "reward"):   # frozen: bit for bit
    jax.tree.map(np.testing.assert_array_equal, before[name], after.extras[name])
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: np.any(a != b), before["policy"],
                                         after.params["policy"]))
  assert any(changed)
  assert int(after.step) == 2                           # 2 iterations x 1 epoch x 1 minibatch


def _np_gae(rewards, values, mask, gamma, lam):
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    last_adv, next_v = 0.0, 0.0
    for t in idx[::-1]:
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      last_adv = delta + gamma * lam * last_adv
      adv[b, t], next_v = last_adv, values[b, t]
  return adv


@pytest.mark.parametrize("algorithm", ["ppo", "rloo", "grpo"])
def test_advantages_match_numpy(dirs, algorithm):
  base = {"ppo": ppo_config, "rloo": rloo_config, "grpo": grpo_config}[algorithm]
  kl_estimator = "k3" if algorithm == "rloo" else "k1"
  config = tiny_config(dirs, base, missing_eos_penalty=0.5, kl_coef=0.3, whiten_advantages=False,
                       kl_estimator=kl_estimator)
  rng = np.random.default_rng(0)
  b, n, k = 6, 5, 2
  mask = (np.arange(n)[None] < np.array([5, 3, 1, 4, 5, 2])[:, None]).astype(np.int32)
  ro = {"response_mask": mask, "scores": rng.normal(size=b).astype(np.float32),
        "contains_eos": np.array([1, 0, 1, 1, 0, 1], bool),
        "logprobs": rng.normal(size=(b, n)).astype(np.float32),
        "ref_logprobs": rng.normal(size=(b, n)).astype(np.float32),
        "values": rng.normal(size=(b, n)).astype(np.float32)}
  assert config.rl.samples_per_prompt == (1 if algorithm == "ppo" else k)
  estimator = algorithms.get(config).advantages
  out, metrics = jax.device_get(estimator(config, {k_: jnp.asarray(v) for k_, v in ro.items()},
                                          0.3))
  scores = ro["scores"] - 0.5 * (~ro["contains_eos"])
  log_r = ro["ref_logprobs"].astype(np.float64) - ro["logprobs"]
  kl = (-log_r if kl_estimator == "k1" else np.expm1(log_r) - log_r) * mask
  seq_reward = scores - 0.3 * kl.sum(1)
  np.testing.assert_allclose(metrics["rlhf_reward"], seq_reward.mean(), rtol=1e-5)
  if algorithm == "ppo":
    rewards = -0.3 * kl
    last = mask.sum(1) - 1
    rewards[np.arange(b), last] += scores
    expected = _np_gae(rewards, ro["values"], mask, 1.0, config.rl.lam)
    np.testing.assert_allclose(out["returns"], (expected + ro["values"]) * mask, atol=1e-5)
  elif algorithm == "rloo":
    g = seq_reward.reshape(-1, k)
    expected = (g - (g.sum(1, keepdims=True) - g) / (k - 1)).reshape(-1)[:, None] * mask
  else:
    g = scores.reshape(-1, k)
    seq = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
    np.testing.assert_allclose(out["sequence_advantages"], seq, atol=1e-4)
    expected = seq[:, None] * mask
  np.testing.assert_allclose(out["advantages"], expected, atol=1e-4)


def test_sharded_iterations_equal_one_device(dirs):
  assert jax.device_count() == 8
  config = first_iteration_config(dirs)
  history_1, _ = run(config, 2)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  history_8, state_8 = run(config, 2, num_devices=8)
  kernel = state_8.params["policy"]["layer_0"]["attn"]["query"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  for m1, m8 in zip(history_1, history_8):
    assert m1.keys() == m8.keys()
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_grpo_text_reward_in_the_loop_nan_stops_the_run(dirs, capfd):
  """A user-registered text reward (the gold reward, recorded) scores the rollout."""
  config = tiny_config(dirs, grpo_config, reward="recorded_gold", reward_checkpoint="")
  config.mesh.update(data=2, fsdp=2, tensor=2)        # 4 prompts x 2 samples a batch
  # The probe at make_step (2 texts) and iteration 1 are scored, then NaN.
  RECORDED_GOLD.calls, RECORDED_GOLD.nan_after = [], 2
  workdir = str(dirs["root"] / "grpo_gold")
  # NaN scores make both the loss and the gradients NaN; the loop names the first it checks.
  with pytest.raises(loop.NonFiniteLossError, match=r"grad_norm is nan at step 2 \(loss nan\)"):
    loop.train(config, workdir, ppo)                  # 8 devices: the callback sees all rows
  RECORDED_GOLD.nan_after = None
  assert "reward 'recorded_gold' returned non-finite scores for 8 of 8" in capfd.readouterr().err
  assert [len(texts) for texts in RECORDED_GOLD.calls] == [2, 8, 8]
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  first, = [r for r in records if r["split"] == "train"]
  assert first["step"] == 1 and first["kl"] == 0.0 and first["kl_loss_term"] > 0
  for k in ("loss", "score", "entropy", "clipfrac", "approx_kl"):
    assert np.isfinite(first[k]), k
  # The step's score is the reward of the texts it sampled (prompt + response).
  first_texts = RECORDED_GOLD.calls[1]
  assert first["score"] == pytest.approx(np.mean(gold_reward.gold_reward(first_texts)), abs=1e-6)


def test_shared_critic_is_a_value_head_on_the_policy(dirs):
  config = tiny_config(dirs, critic="shared", reward="gold", reward_checkpoint="")
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh):
    state = ppo.init(config, jax.random.key(0), mesh)
    prompts = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    batch = {"prompt_tokens": prompts, "prompt_mask": prompts}
    _, metrics = jax.eval_shape(ppo.make_step(config), state, batch, jax.random.key(0))
  assert set(state.params) == {"policy"}
  head = jax.device_get(state.params["policy"]["scalar_head"])   # a new value head: V = 0
  assert not np.any(head["kernel"]) and not np.any(head["bias"])
  assert "scalar_head" not in state.extras["reference"] and "reward" not in state.extras
  assert {"value_loss", "explained_variance"} <= set(metrics)


def test_rloo_runs_and_evaluates(dirs):
  config = tiny_config(dirs, rloo_config)
  history, state = run(config, 2)
  config.sampling.gold_reward = "recorded_gold"     # the evaluation's gold: a named text reward
  RECORDED_GOLD.calls, RECORDED_GOLD.nan_after = [], None
  assert history[0]["kl"] == 0.0 and history[1]["kl"] != 0.0
  assert all(np.isfinite(m["loss"]) for m in history)
  mesh, _, _ = compiled(config)
  with jax.set_mesh(mesh):
    metrics = ppo.evaluate(config, state, ppo.make_data(config, config.data.data_dir), mesh,
                           jax.random.key(0))
  for k in ("gold_mean", "gold_std", "kl", "kl_stderr", "length_mean", "rm_score"):
    assert np.isfinite(metrics[k]), k
  assert metrics["num"] == config.data.eval_batch_size * config.train.eval_batches
  texts, = RECORDED_GOLD.calls                       # one call: every prompt + response
  gold = gold_reward.gold_reward(texts)
  assert len(texts) == metrics["num"]
  assert metrics["gold_mean"] == pytest.approx(np.mean(gold), rel=1e-6)
  assert metrics["gold_std"] == pytest.approx(np.std(gold, ddof=1), rel=1e-5)
  assert metrics["samples"][0] == f"{texts[0]}  [gold {gold[0]:+.2f}]"
  assert len(metrics["samples"]) == config.sampling.eval_texts
  assert all(isinstance(t, str) for t in metrics["samples"])
  json.dumps(metrics)


def test_nan_model_reward_gives_nan_loss_and_message(dirs, capfd):
  config = first_iteration_config(dirs)
  _, state, _ = compiled(config)
  reward = jax.tree.map(lambda x: x, state.extras["reward"])
  reward["scalar_head"] = dict(reward["scalar_head"],
                               bias=jnp.full_like(reward["scalar_head"]["bias"], jnp.nan))
  history, _ = run(config, 1, state=state.replace(extras=dict(state.extras, reward=reward)))
  assert np.isnan(history[0]["loss"]) and np.isnan(history[0]["score"])
  assert "reward 'model' returned non-finite scores for 8 of 8" in capfd.readouterr().err


def test_wrong_reward_shape_is_a_clear_error(dirs, monkeypatch):
  config = first_iteration_config(dirs)
  mesh, state, _ = compiled(config)
  score = reward_lib.score
  monkeypatch.setattr(reward_lib, "score", lambda *a: score(*a)[:, None])
  batch = sharding_lib.put_batch(next(ppo.make_data(config, config.data.data_dir).train), mesh)
  expected = r"reward 'model' returned shape \(8, 1\), expected"
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=expected):
    jax.eval_shape(ppo.make_step(config), state, batch, jax.random.key(0))
  with pytest.raises(ValueError, match="reward 'two_columns'.*expected 2 finite scores"):
    ppo.make_step(tiny_config(dirs, reward="two_columns"))


def test_config_errors_name_the_field(dirs):
  known = ", ".join(algorithms.ALGORITHMS.names())   # grpo, online_dpo, ppo, rloo
  with pytest.raises(ValueError, match=f"config.rl.algorithm: unknown RL algorithm 'dpo'; known: "
                                       f"{known} "):
    models_lib.make_models(tiny_config(dirs, algorithm="dpo"))
  with pytest.raises(ValueError, match="config.rl.reward: unknown reward 'vader'; known: .*gold"
                                       ".*model"):
    ppo.init(tiny_config(dirs, reward="vader"), jax.random.key(0), None)
  with pytest.raises(ValueError, match="config.rl.samples_per_prompt: rloo needs >= 2"):
    models_lib.make_models(tiny_config(dirs, rloo_config, samples_per_prompt=1))
  with pytest.raises(ValueError, match="config.rl.reward_checkpoint"):
    models_lib.make_models(tiny_config(dirs, reward_checkpoint=""))
  with pytest.raises(ValueError, match="policy: max_len=32 .* config.sampling.max_new_tokens"):
    models_lib.make_models(tiny_config(dirs, max_new_tokens=20))


def test_reward_pooling_comes_from_the_reward_runs_config(dirs, tmp_path):
  assert models_lib.make_models(tiny_config(dirs)).reward_pooling == "last"   # no field: last
  with open(os.path.join(dirs["rm"], "config.json")) as f:
    saved = json.load(f)
  for pooling in ("sum", "mean"):
    rm_dir = tmp_path / pooling
    rm_dir.mkdir()
    with open(rm_dir / "config.json", "w") as f:
      json.dump(dict(saved, reward={"pooling": pooling}), f)
    config = tiny_config(dirs, reward_checkpoint=str(rm_dir))
    if pooling == "sum":
      assert models_lib.make_models(config).reward_pooling == "sum"
    else:
      with pytest.raises(ValueError,
                         match=r"config.json: reward.pooling: expected one of .*, got 'mean'"):
        models_lib.make_models(config)


def test_preference_pairs_pick_best_and_worst_and_drop_ties():
  k, n = 3, 4
  scores = np.array([0.1, 0.9, -0.5,   0.2, 0.2, 0.2,   1.0, -1.0, 0.0], np.float32)
  rng = np.random.default_rng(0)
  ro = {"tokens": np.arange(9)[:, None] * np.ones((1, 6), np.int32),
        "mask": np.ones((9, 6), np.int32),
        "response_mask": (np.arange(n)[None] < rng.integers(1, n + 1, size=9)[:, None]).astype(np.int32),
        "ref_logprobs": rng.normal(size=(9, n)).astype(np.float32), "scores": scores}
  pairs, metrics = jax.device_get(algorithms.preference_pairs(
      {k_: jnp.asarray(v) for k_, v in ro.items()}, k))
  np.testing.assert_array_equal(pairs["chosen_tokens"][:, 0], [1, 3, 6])    # argmax per prompt
  np.testing.assert_array_equal(pairs["rejected_tokens"][:, 0], [2, 3, 7])  # argmin per prompt
  np.testing.assert_array_equal(pairs["valid"], [1.0, 0.0, 1.0])
  ref_sums = (ro["ref_logprobs"] * ro["response_mask"]).sum(1)
  np.testing.assert_allclose(pairs["reference_chosen_logps"], ref_sums[[1, 3, 6]], rtol=1e-6)
  np.testing.assert_allclose(pairs["reference_rejected_logps"], ref_sums[[2, 3, 7]], rtol=1e-6)
  assert metrics["tied_fraction"] == pytest.approx(1 / 3)
  assert metrics["score_gap"] == pytest.approx((1.4 + 0.0 + 2.0) / 3)


def test_online_dpo_round_trains_dpo_on_its_own_samples(dirs):
  from configs import online_dpo as online_dpo_config
  from rlhf_jax.stages import dpo as dpo_stage
  config = tiny_config(dirs, online_dpo_config, temperature=1.0, epochs=1, num_minibatches=1,
                       kl_coef=1.0)
  config.data.batch_size = 8
  _, state, _ = compiled(config)
  before = jax.device_get(state.extras["reference"])
  history, state = run(config, 2)
  first, second = history
  # Round 1 samples from pi == pi_ref: every log-ratio is 0, so the DPO loss is log 2.
  assert first["loss"] == pytest.approx(np.log(2.0), abs=1e-5)
  assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
  assert first["tied_fraction"] < 1.0 and first["score_gap"] > 0.0
  assert abs(second["rewards/margin"]) > 1e-3                       # the policy moved
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.extras["reference"]))
  # The online loss equals the offline DPO stage's on the same pairs, laid out as it lays
  # them out (loss_mask on the response), with the trained policy.
  mesh, _, _ = compiled(config)
  models = models_lib.make_models(config)
  batch = next(ppo.make_data(config, config.data.data_dir).train)
  prompts = {k: jnp.repeat(jnp.asarray(v), 2, axis=0) for k, v in batch.items()
             if k.startswith("prompt_")}
  with jax.set_mesh(mesh):
    ro = rollout_lib.rollout(config, models, rewards.get(config).make_fn(config, models),
                             state.params, state.extras, prompts["prompt_tokens"],
                             prompts["prompt_mask"], jax.random.key(3))
    pairs, _ = algorithms.preference_pairs(ro, 2)
    loss, metrics = algorithms.online_dpo_loss(config, models)(state.params, state.extras, pairs,
                                                               None)
  p = config.data.prompt_len
  offline = {}
  for name in ("chosen", "rejected"):
    offline[f"{name}_tokens"] = pairs[f"{name}_tokens"]
    offline[f"{name}_mask"] = pairs[f"{name}_mask"]
    offline[f"{name}_loss_mask"] = jnp.pad(pairs[f"{name}_response_mask"], ((0, 0), (p, 0)))
  dc = config.copy_and_resolve_references()
  dc.dpo = dict(loss="sigmoid", beta=config.rl.kl_coef, label_smoothing=0.0)
  dc = ml_collections.ConfigDict(dc.to_dict())
  expected, expected_metrics = dpo_stage.dpo_loss_and_metrics(
      dc.dpo, models.reference, state.params["policy"], state.extras["reference"],
      jax.tree.map(lambda x: x[np.asarray(pairs["valid"]) == 1], offline))
  np.testing.assert_allclose(loss, expected, rtol=2e-5)
  np.testing.assert_allclose(metrics["rewards/margin"], expected_metrics["rewards/margin"],
                             rtol=2e-5, atol=1e-6)


def test_online_dpo_config_errors_name_the_field(dirs):
  from configs import online_dpo as online_dpo_config
  with pytest.raises(ValueError, match="config.rl.dpo_loss"):
    models_lib.make_models(tiny_config(dirs, online_dpo_config, temperature=1.0, dpo_loss="kto"))
  with pytest.raises(ValueError, match="config.sampling.temperature"):
    models_lib.make_models(tiny_config(dirs, online_dpo_config, temperature=0.7))
  with pytest.raises(ValueError, match="config.rl.num_minibatches.*4 pairs"):
    models_lib.make_models(tiny_config(dirs, online_dpo_config, temperature=1.0,
                                        num_minibatches=3))
