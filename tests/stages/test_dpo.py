"""DPO stage: loss against an independent NumPy formula, the reference never moves, every loss runs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dpo as dpo_config
from rlhf_jax import tokenizers
from rlhf_jax.data import collate
from rlhf_jax.stages import common
from rlhf_jax.stages import dpo
from rlhf_jax.train import loop
from rlhf_jax.train import checkpoint as checkpoint_lib
from tests.stages.pairs import pair_config


def numpy_sequence_logp(model, params, tokens, mask, loss_mask):
  out, _ = model.apply({"params": params}, jnp.asarray(tokens[None]),
                       jnp.asarray(np.maximum(np.cumsum(mask) - 1, 0)[None]), jnp.asarray(mask[None]))
  logits = np.asarray(out["logits"][0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return sum(logp[t - 1, tokens[t]] for t in range(1, len(tokens)) if loss_mask[t])


def test_dpo_loss_matches_numpy(tmp_path):
  config = pair_config(dpo_config, tmp_path)
  config.dpo.beta = 0.5
  model = common.make_model(config)
  init = lambda r: model.init(r, *(jnp.zeros((1, 4), jnp.int32),) * 2, jnp.ones((1, 4), jnp.int32))["params"]
  unbox = lambda t: jax.tree.map(lambda x: getattr(x, "value", x), t, is_leaf=lambda x: hasattr(x, "value"))
  policy, reference = unbox(init(jax.random.key(0))), unbox(init(jax.random.key(1)))
  batch = next(dpo.make_data(config, str(tmp_path)).train)
  loss, metrics = dpo.dpo_loss_and_metrics(config.dpo, model, policy, reference,
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


def test_reference_is_never_updated_and_loss_starts_at_log2(tmp_path):
  config = pair_config(dpo_config, tmp_path, num_steps=5, checkpoint_every=5)
  config.optimizer.learning_rate = 1e-2
  config.dpo.update(eval_prompts=3, max_new_tokens=8)
  workdir = str(tmp_path / "run")
  final = loop.train(config, workdir, dpo)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train = [json.loads(l) for l in f if '"train"' in l]
  assert abs(train[0]["loss"] - np.log(2)) < 1e-6        # policy == reference at step 1
  assert final["dpo_loss"] < np.log(2) - 0.1               # held-out pairs: it learned
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  with jax.set_mesh(mesh):
    fresh = dpo.init(config, loop.run_keys(config.seed)[0], mesh)
    mngr = checkpoint_lib.manager(workdir, 2)
    state, _ = checkpoint_lib.restore(mngr, 5, fresh)
  # The reference equals the initial policy bit for bit; the policy has moved.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.extras["reference"], fresh.params)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params, fresh.params))
  assert all(moved)
  # Sampled responses to 3 held-out prompts: KL 0 while policy == reference, > 0 after.
  assert final["sampled/num"] == 3 and -1.0 <= final["sampled/gold_mean"] <= 1.0
  assert final["sampled/kl"] > 0.01
  with jax.set_mesh(mesh):
    at_start = dpo.sampled_metrics(config, fresh, dpo.make_data(config, workdir), mesh,
                                   jax.random.key(0))
  assert abs(at_start["sampled/kl"]) < 1e-4


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


@pytest.mark.parametrize("loss", dpo.LOSSES)
def test_every_loss_trains_a_step(tmp_path, loss):
  config = pair_config(dpo_config, tmp_path, num_steps=2)
  config.dpo.loss = loss
  metrics = loop.train(config, str(tmp_path / loss), dpo)
  assert np.isfinite(metrics["dpo_loss"])


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if '"train"' in l]


def test_precomputed_reference_logps_train_as_the_step_does(tmp_path):
  config = pair_config(dpo_config, tmp_path, num_steps=3)
  config.optimizer.learning_rate = 1e-2
  step_metrics = loop.train(config, str(tmp_path / "step"), dpo)
  config.dpo.reference = "precompute"
  workdir = str(tmp_path / "precompute")
  pre_metrics = loop.train(config, workdir, dpo)
  for a, b in zip(_train_losses(str(tmp_path / "step")), _train_losses(workdir)):
    for k in ("loss", "rewards/margin", "rewards/chosen", "logps/rejected"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
  for k in ("dpo_loss", "rewards/accuracy", "rewards/margin"):
    np.testing.assert_allclose(pre_metrics[k], step_metrics[k], rtol=1e-5, atol=1e-6)
  # The cache: every record has a finite value; a fresh run reuses it; the state has no
  # reference params (evaluation does not sample here).
  cache = os.path.join(workdir, "reference_logps.npz")
  with np.load(cache) as saved:
    assert np.all(np.isfinite(saved["train/reference_chosen_logps"]))
    assert len(saved["test/reference_rejected_logps"]) > 0
  mtime = os.path.getmtime(cache)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  with jax.set_mesh(mesh):
    batch = next(dpo.make_data(config, workdir).train)
    assert os.path.getmtime(cache) == mtime
    assert {"reference_chosen_logps", "reference_rejected_logps"} <= set(batch)
    assert "reference" not in dpo.init(config, jax.random.key(0), mesh).extras
  config.data.seq_len = 40          # another layout: the cache is recomputed, not misread
  with jax.set_mesh(mesh):
    dpo.make_data(config, workdir)
  assert os.path.getmtime(cache) != mtime


def test_bad_reference_mode_names_the_field(tmp_path):
  config = pair_config(dpo_config, tmp_path)
  config.dpo.reference = "cached"
  with pytest.raises(ValueError, match="config.dpo.reference"):
    dpo.make_data(config, str(tmp_path))


def test_eval_prompt_batches_cut_by_global_row_on_every_process(monkeypatch):
  config = dpo_config.get_config()
  config.data.update(eval_batch_size=8, prompt_len=6)
  config.dpo.eval_prompts = 11
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  example = collate.preference_example(tokenizer, "Review", " fine.", " bad.", 48)
  kept = []
  for process in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda p=process: p)
    # Three global batches of 8; this process holds rows [4p, 4p + 4) of each.
    batches = [{**{k: np.stack([v] * 4) for k, v in example.items()},
                "valid": np.ones(4, np.int32)} for _ in range(3)]
    out = list(dpo._prompt_batches(config, batches, tokenizer.pad_id))
    assert len(out) == 2                                   # ceil(11 / 8) on every process
    kept.append(np.concatenate([b["valid"] for b in out]))
  # Global rows 0..10 are kept: batch 0 all 8, batch 1 rows 8, 9, 10 (process 0's first 3).
  np.testing.assert_array_equal(kept[0], [1, 1, 1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(kept[1], [1, 1, 1, 1, 0, 0, 0, 0])
