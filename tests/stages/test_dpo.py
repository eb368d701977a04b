"""DPO stage: loss against an independent NumPy formula, the reference never moves, every loss
trains, evaluation reports the training loss, sampling over distinct prompts, the reference cache."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpo as dpo_config
from rlhf_jax import tokenizers
from rlhf_jax.data import collate
from rlhf_jax.objectives import preference
from rlhf_jax.stages import common
from rlhf_jax.stages import dpo
from rlhf_jax.stages import reward as reward_stage
from rlhf_jax.train import loop
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import sharding as sharding_lib
from tests.stages.pairs import pair_config


def one_device_mesh():
  return jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


def numpy_sequence_logp(model, params, tokens, mask, loss_mask):
  out, _ = model.apply({"params": params}, jnp.asarray(tokens[None]),
                       jnp.asarray(np.maximum(np.cumsum(mask) - 1, 0)[None]), jnp.asarray(mask[None]))
  logits = np.asarray(out["logits"][0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return sum(logp[t - 1, tokens[t]] for t in range(1, len(tokens)) if loss_mask[t])


def test_dpo_loss_matches_numpy(tmp_path):
  config = pair_config(dpo_config, tmp_path)
  config.preference.beta = 0.5
  model = common.make_model(config)
  init = lambda r: model.init(r, *(jnp.zeros((1, 4), jnp.int32),) * 2, jnp.ones((1, 4), jnp.int32))["params"]
  unbox = lambda t: jax.tree.map(lambda x: getattr(x, "value", x), t, is_leaf=lambda x: hasattr(x, "value"))
  policy, reference = unbox(init(jax.random.key(0))), unbox(init(jax.random.key(1)))
  batch = next(dpo.make_data(config, str(tmp_path)).train)
  loss, metrics = dpo.dpo_loss_and_metrics(config.preference, model, policy, reference,
                                           {k: jnp.asarray(v) for k, v in batch.items()})
  h = []
  for i in range(batch["chosen_tokens"].shape[0]):
    lp = {}
    for name, params in (("pi", policy), ("ref", reference)):
      for side in ("chosen", "rejected"):
        lp[name, side] = numpy_sequence_logp(model, params, batch[f"{side}_tokens"][i],
                                             batch[f"{side}_mask"][i], batch[f"{side}_loss_mask"][i])
    h.append((lp["pi", "chosen"] - lp["ref", "chosen"]) - (lp["pi", "rejected"] - lp["ref", "rejected"]))
  expected = np.mean(np.log1p(np.exp(-0.5 * np.asarray(h))))   # -log sigmoid(beta h), DPO eq. 7
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if f'"{split}"' in l]


def test_reference_is_never_updated_and_sampling_covers_distinct_prompts(tmp_path):
  config = pair_config(dpo_config, tmp_path, num_steps=5, checkpoint_every=5)
  config.optimizer.learning_rate = 1e-2
  config.data.update(eval_fraction=0.3,   # held-out pairs share prompts (7 prompts in all)
                     seq_len=64)           # no prompt cut short
  config.sampling.update(eval_prompts=256, max_new_tokens=8, eval_texts=256, eval_batch_size=8)
  workdir = str(tmp_path / "run")
  final = loop.train(config, workdir, dpo)
  assert abs(_records(workdir, "train")[0]["loss"] - np.log(2)) < 1e-6   # policy == reference
  assert final["loss"] < np.log(2) - 0.1                   # held-out pairs: it learned
  mesh = one_device_mesh()
  with jax.set_mesh(mesh):
    fresh = dpo.init(config, loop.run_keys(config.seed)[0], mesh)
    mngr = checkpoint_lib.manager(workdir, 2)
    state, _ = checkpoint_lib.restore(mngr, 5, fresh)
  # The reference equals the initial policy bit for bit; the policy has moved.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.extras["reference"], fresh.params)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, fresh.params))
  assert all(moved)
  # One sample per distinct held-out prompt, not one per pair.
  splits, transform, _, _ = reward_stage.preference_splits(config, workdir)
  test = [splits["test"][i] for i in range(len(splits["test"]))]
  prompts = [r["prompt"] for r in test if transform(r) is not None]
  assert len(prompts) > len(set(prompts))                   # the split repeats prompts
  assert final["num_pairs"] == len(prompts)
  assert final["sampled/num"] == len(set(prompts))
  sampled_prompts = [t.split(": the movie was")[0] for t in final["sampled/samples"]]
  assert sorted(sampled_prompts) == sorted({p.split(": the movie was")[0] for p in prompts})
  # Its gold mean is over those samples, each once (each gold shown to 2 decimals).
  golds = [float(t.rsplit("  [gold ", 1)[1].rstrip("]")) for t in final["sampled/samples"]]
  np.testing.assert_allclose(final["sampled/gold_mean"], np.mean(golds), atol=0.005)
  # KL 0 while policy == reference, > 0 after.
  assert final["sampled/kl"] > 0.01
  with jax.set_mesh(mesh):
    at_start = dpo.sampled_metrics(config, fresh, dpo.make_data(config, workdir), mesh,
                                   jax.random.key(0))
  assert abs(at_start["sampled/kl"]) < 1e-4


def test_heldout_prompts_are_distinct_and_split_by_process():
  tokenizer = tokenizers.make_tokenizer(dpo_config.get_config().tokenizer)
  config = dpo_config.get_config()
  config.data.prompt_len = 12
  names = ["a", "b", "a", "c", "b", "a", "d", "e"]         # 5 distinct prompts, in this order
  examples = [collate.preference_example(tokenizer, f"Review {n}", " fine.", " bad.", 48)
              for n in names]
  stack = lambda rows: {k: np.stack([e[k] for e in rows]) for k in rows[0]}
  batches = [dict(stack(examples[:4]), valid=np.ones(4, np.int32)),
             dict(stack(examples[4:]), valid=np.array([1, 1, 0, 1], np.int32))]   # "d" is padding
  expected = [collate.prompt_example(tokenizer, f"Review {n}", 12)["prompt_tokens"]
              for n in ("a", "b", "c", "e")]
  for limit, want in ((3, expected[:3]), (256, expected)):
    config.sampling.eval_prompts = limit
    with jax.set_mesh(one_device_mesh()):
      prompts = dpo.heldout_prompts(config, batches, one_device_mesh(), tokenizer.pad_id)
    np.testing.assert_array_equal(prompts["prompt_tokens"], want)
  # Batches of 4 global rows over 2 processes: each prompt sampled once, by one process, and
  # every process runs the same number of (collective) batches.
  shares = [list(dpo.prompt_batches(prompts, 4, p, 2)) for p in range(2)]
  assert len(shares[0]) == len(shares[1]) == 1
  rows = [b["prompt_tokens"][b["valid"] == 1] for share in shares for b in share]
  np.testing.assert_array_equal(np.concatenate(rows), prompts["prompt_tokens"])
  shares = list(dpo.prompt_batches(prompts, 3, 0, 1))
  assert [len(b["valid"]) for b in shares] == [3, 3] and shares[1]["valid"].tolist() == [1, 0, 0]


def test_pair_prompts_equal_the_prompt_layout():
  tokenizer = tokenizers.make_tokenizer(dpo_config.get_config().tokenizer)
  prompts = ["Review 3: the movie was", "A"]
  examples = [collate.preference_example(tokenizer, p, " fine.", " bad.", 48) for p in prompts]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  batch["valid"] = np.array([1, 0], np.int32)
  for prompt_len in (40, 6):   # no cut; cut from the left keeping BOS
    out = dpo.pair_prompts(batch, prompt_len, tokenizer.pad_id)
    for i, p in enumerate(prompts):
      expected = collate.prompt_example(tokenizer, p, prompt_len)
      np.testing.assert_array_equal(out["prompt_tokens"][i], expected["prompt_tokens"])
      np.testing.assert_array_equal(out["prompt_mask"][i], expected["prompt_mask"])
    np.testing.assert_array_equal(out["valid"], [1, 0])


# Step 1 (policy == reference, every log-ratio 0) has a closed-form loss for the losses
# with a reference; beta = 0.1: IPO's target 1 / (2 beta) = 5.
LOSS_AT_STEP_1 = {"sigmoid": np.log(2), "robust": np.log(2), "ipo": 25.0,
                  "ipo_length_normalised": 25.0, "hinge": 1.0, "kto": 0.5}


def _step_loss_config(tmp_path, loss):
  config = pair_config(dpo_config, tmp_path, num_steps=4)
  config.optimizer.learning_rate = 1e-2
  config.preference.loss = loss
  return config


# Cheaper compiles for these tiny programs, as in test_ppo.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
  """(mesh, initial state, data) shared by every loss: the loss does not enter them."""
  config = _step_loss_config(tmp_path_factory.mktemp("dpo_losses"), "sigmoid")
  mesh = sharding_lib.make_mesh(config.mesh)               # the loop's mesh: all 8 devices
  with jax.set_mesh(mesh):
    data = dpo.make_data(config, config.data.data_dir)
    state = dpo.init(config, loop.run_keys(config.seed)[0], mesh)
  return config, mesh, state, data


@pytest.fixture(scope="module")
def trained(initial):
  """loss -> (config, [state before each step], [train metrics of each step], final eval):
  4 steps of the loop's jitted step (warm-up 1, so step 1 does not move the policy) on
  the loop's batches, each loss compiled once for both tests below."""
  cache = {}

  def run(loss):
    if loss not in cache:
      base, mesh, state, data = initial
      config = base.copy_and_resolve_references()
      config.preference.loss = loss
      with jax.set_mesh(mesh):
        train = iter(dpo.make_data(config, config.data.data_dir).train)
        batches = [sharding_lib.put_batch(next(train), mesh) for _ in range(4)]
        keys = [jax.random.fold_in(loop.run_keys(config.seed)[1], i) for i in range(1, 5)]
        step = loop.jit_step(dpo, config, state, mesh).lower(state, batches[0], keys[0]).compile(
            FAST_COMPILE)
        state = jax.tree.map(jnp.copy, state)               # the step donates it
        states, metrics = [], []
        for batch, key in zip(batches, keys):
          states.append(jax.tree.map(jnp.copy, state))
          state, m = step(state, batch, key)
          metrics.append(jax.device_get(m))
        final = dpo.evaluate(config, state, data, mesh, jax.random.key(3))
      cache[loss] = config, states, metrics, final
    return cache[loss]
  return run


@pytest.mark.parametrize("loss", preference.LOSSES.names())
def test_every_loss_trains_a_step(trained, loss):
  _, _, metrics, final = trained(loss)
  first = float(metrics[0]["loss"])
  if loss in LOSS_AT_STEP_1:
    np.testing.assert_allclose(first, LOSS_AT_STEP_1[loss], rtol=1e-6)
  assert final["loss"] < first - 0.01 * abs(first)          # its own loss fell, held out
  assert final["rewards/accuracy"] > 0.5


@pytest.mark.parametrize("loss", ["sigmoid", "simpo", "orpo", "ipo", "ipo_length_normalised",
                                  "kto"])
def test_evaluation_reports_the_training_loss(trained, initial, loss):
  config, states, metrics, _ = trained(loss)
  _, mesh, _, _ = initial
  # The state after step 2 (policy != reference: step 2 had a learning rate) evaluated on
  # step 3's batch reports step 3's metrics.
  batch = next(b for i, b in enumerate(iter(dpo.make_data(config, config.data.data_dir).train))
               if i == 2)
  train = metrics[2]
  with jax.set_mesh(mesh):
    evaluated = dpo.evaluate(config, states[2], loop.Data(
        train=None, eval=lambda: [dict(batch, valid=np.ones(8, np.int32))]), mesh,
        jax.random.key(3))
  assert set(train) - {"grad_norm", "learning_rate"} <= set(evaluated)
  for k in set(train) - {"grad_norm", "learning_rate"}:
    np.testing.assert_allclose(evaluated[k], train[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert abs(train["loss"] - LOSS_AT_STEP_1.get(loss, 0.0)) > 1e-3   # not the step-1 value


def test_evaluation_drops_padding_rows(tmp_path):
  config = pair_config(dpo_config, tmp_path)
  config.preference.loss = "kto"            # z0 is a batch mean: padding must not enter it
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
  mesh = one_device_mesh()
  batch = next(dpo.make_data(config, str(tmp_path)).train)
  padded = {k: np.concatenate([v[:5], v[4:5].repeat(3, axis=0)]) for k, v in batch.items()}
  padded["valid"] = np.array([1] * 5 + [0] * 3, np.int32)
  with jax.set_mesh(mesh):
    state = dpo.init(config, jax.random.key(0), mesh)
    state, _ = jax.jit(dpo.make_step(config))(state, batch, jax.random.key(1))
    evaluated = dpo.evaluate(config, state, loop.Data(train=None, eval=lambda: [padded]), mesh,
                             jax.random.key(3))
  real = {k: v[:5] for k, v in batch.items()}
  loss, metrics = dpo.dpo_loss_and_metrics(config.preference, common.make_model(config),
                                           state.params, state.extras["reference"], real)
  np.testing.assert_allclose(evaluated["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(evaluated["kto/z0"], metrics["kto/z0"], rtol=1e-5, atol=1e-7)
  assert evaluated["num_pairs"] == 5


def _train_losses(workdir):
  return _records(workdir, "train")


def test_precomputed_reference_logps_train_as_the_step_does(tmp_path):
  config = pair_config(dpo_config, tmp_path, num_steps=3)
  config.optimizer.learning_rate = 1e-2
  step_metrics = loop.train(config, str(tmp_path / "step"), dpo)
  config.preference.reference = "precompute"
  workdir = str(tmp_path / "precompute")
  pre_metrics = loop.train(config, workdir, dpo)
  for a, b in zip(_train_losses(str(tmp_path / "step")), _train_losses(workdir)):
    for k in ("loss", "rewards/margin", "rewards/chosen", "logps/rejected"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in ("loss", "rewards/accuracy", "rewards/margin"):
    np.testing.assert_allclose(pre_metrics[k], step_metrics[k], rtol=1e-5, atol=1e-6)
  # The cache: every record has a finite value; a fresh run reuses it; the state has no
  # reference params (evaluation does not sample here).
  cache = os.path.join(workdir, "reference_logps.npz")
  with np.load(cache) as saved:
    assert np.all(np.isfinite(saved["train/reference_chosen_logps"]))
    assert len(saved["test/reference_rejected_logps"]) > 0
  mtime = os.path.getmtime(cache)
  mesh = one_device_mesh()
  with jax.set_mesh(mesh):
    batch = next(dpo.make_data(config, workdir).train)
    assert os.path.getmtime(cache) == mtime
    assert {"reference_chosen_logps", "reference_rejected_logps"} <= set(batch)
    # The state's structure, traced without compiling (its shapes suffice here).
    assert "reference" not in jax.eval_shape(lambda: dpo.init(config, jax.random.key(0),
                                                              mesh)).extras
  config.data.seq_len = 40          # another layout: the cache is recomputed, not misread
  with jax.set_mesh(mesh):
    dpo.make_data(config, workdir)
  assert os.path.getmtime(cache) != mtime


def test_precomputed_reference_logps_follow_the_reference_run(tmp_path):
  # The reference is another run's checkpoint; when that run trains further, a restarted
  # DPO run must recompute the cache, not reuse the old reference's log-probs.
  reference_run = str(tmp_path / "reference")
  config = pair_config(dpo_config, tmp_path, num_steps=2, checkpoint_every=2)
  config.optimizer.learning_rate = 1e-2
  loop.train(config, reference_run, dpo)
  config.preference.reference = "precompute"
  config.init.checkpoint = reference_run
  workdir = str(tmp_path / "dpo")
  mesh = one_device_mesh()
  load = lambda: np.load(os.path.join(workdir, "reference_logps.npz"))
  with jax.set_mesh(mesh):
    dpo.make_data(config, workdir)
  with load() as saved:
    before = saved["train/reference_chosen_logps"].copy()
  further = pair_config(dpo_config, tmp_path, num_steps=4, checkpoint_every=2)
  further.optimizer.learning_rate = 1e-2
  loop.train(further, reference_run, dpo)                   # resumes at 2, ends at 4
  with jax.set_mesh(mesh):
    batch = next(dpo.make_data(config, workdir).train)
  with load() as saved:
    after = saved["train/reference_chosen_logps"]
    meta = json.loads(str(saved["meta"]))
  assert np.max(np.abs(after - before)) > 1e-3
  # The new values are the trained reference's: the step-1 implicit rewards are 0 (the
  # step's loss and metrics, forward only: no gradient needed).
  with jax.set_mesh(mesh):
    state = dpo.init(config, jax.random.key(0), mesh)
    step_metrics = lambda params, extras, batch: dpo.dpo_loss_and_metrics(
        config.preference, common.make_model(config), params, extras.get("reference"), batch)[1]
    args = (state.params, state.extras, batch)
    metrics = jax.jit(step_metrics).lower(*args).compile(FAST_COMPILE)(*args)
  np.testing.assert_allclose(metrics["rewards/chosen"], 0.0, atol=1e-5)
  assert meta["reference_step"] == 4


def test_bad_reference_mode_and_unknown_loss_name_the_field(tmp_path):
  config = pair_config(dpo_config, tmp_path)
  config.preference.reference = "cached"
  with pytest.raises(ValueError, match="config.preference.reference"):
    dpo.make_data(config, str(tmp_path))
  config = pair_config(dpo_config, tmp_path)
  config.preference.loss = "dpo"
  with pytest.raises(ValueError, match="config.preference.loss: .*'dpo'.*sigmoid, simpo"):
    dpo.init(config, jax.random.key(0), one_device_mesh())
