"""Sharding rules do what they say; remat and mixed precision; resharding restore.

FSDP: params and optimizer state per device fall as 1/N (counted from the shards
and from the compiled step's argument sizes). Tensor parallelism splits heads and
MLP, not the embed dim. A checkpoint saved on an 8x1x1 mesh restores onto 2x2x2
and onto 1 device, and the next step's loss is the same on every mesh.
"""

import contextlib
import functools
import io
import re

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from configs import sft as sft_config
from rlhf_jax.model import transformer
from rlhf_jax.objectives import sft as sft_objective
from rlhf_jax.stages import common
from rlhf_jax.stages import sft
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import sharding as sharding_lib

BATCH, SEQ = 8, 32


def tiny_config(**model):
  c = sft_config.get_config()
  c.model = base.model_config("tiny")           # embed 64: divisible by 8
  c.model.update(**model)
  c.train.num_steps = 10
  c.optimizer.warmup_steps = 0                  # a non-zero learning rate from step 1
  return c


def make_batch(seed, batch=BATCH, seq=SEQ):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 264, (batch, seq)).astype(np.int32)
  lengths = rng.integers(seq // 2, seq + 1, batch)
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = mask * (np.arange(seq)[None] >= 4)
  return {"tokens": tokens * mask, "mask": mask, "loss_mask": loss_mask.astype(np.int32)}


def mesh_of(config, data, fsdp, tensor, devices=None):
  config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return sharding_lib.make_mesh(config.mesh, devices)


def jit_step(config, state, mesh):
  shardings = sharding_lib.shardings_of(state)
  return jax.jit(sft.make_step(config),
                 in_shardings=(shardings, sharding_lib.batch_sharding(mesh),
                               sharding_lib.replicated(mesh)),
                 out_shardings=(shardings, sharding_lib.replicated(mesh)))


@functools.cache
def initialised(axes):
  """(config, mesh, state, jitted step) of the 1-layer tiny model on a data x fsdp x tensor mesh."""
  config = tiny_config(num_layers=1)
  mesh = mesh_of(config, *axes, devices=jax.devices()[:int(np.prod(axes))])
  with jax.set_mesh(mesh):
    state = sft.init(config, jax.random.key(0), mesh)
  return config, mesh, state, jit_step(config, state, mesh)


def bytes_on(tree, device):
  """Bytes of `tree`'s shards that live on `device`."""
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def test_fsdp_params_and_optimizer_state_fall_as_one_over_n():
  config = tiny_config(num_layers=1)
  num_params = transformer.num_params(transformer.TransformerConfig.from_dict(config.model))
  from_shards, from_compiler = {}, {}
  for n in (1, 2, 4, 8):
    config, mesh, state, step = initialised((8 // n, n, 1))
    from_shards[n] = [bytes_on((state.params, state.opt_state), d) for d in jax.devices()]
    if n in (1, 8):       # the compiler agrees (compiling every N costs more than it shows)
      batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding_lib.batch_sharding(mesh))
               for k, v in make_batch(0).items()}
      compiled = step.lower(sharding_lib.abstract_with_shardings(state), batch,
                            jax.random.key(0)).compile()
      # Arguments of the per-device program: state (params, opt_state, step) + batch + rng.
      batch_bytes = 3 * BATCH * SEQ * 4 // 8
      from_compiler[n] = compiled.memory_analysis().argument_size_in_bytes - batch_bytes
    for d, b in enumerate(from_shards[n]):
      assert b == from_shards[n][0], f"N={n}: device {d} holds {b} bytes, device 0 {from_shards[n][0]}"
  # Unsharded: params, Adam's mu and nu, float32 (+ a few scalar counters).
  assert 12 * num_params <= from_shards[1][0] < 12 * num_params + 64
  for n in (2, 4, 8):
    ratio = from_shards[n][0] * n / from_shards[1][0]
    assert 0.9 <= ratio <= 1.1, (n, ratio)
  assert 0.9 <= from_compiler[8] * 8 / from_compiler[1] <= 1.1, from_compiler
  assert abs(from_compiler[1] - from_shards[1][0]) < 64, (from_compiler, from_shards[1])


def test_rules_shard_what_they_say():
  """FSDP splits the embed dim, tensor parallelism heads, MLP and vocab; data parallel nothing."""
  P = jax.sharding.PartitionSpec
  specs = {("embed", "embedding"): P("tensor", "fsdp"),               # [vocab, embed]
           ("layer_0", "attn", "query", "kernel"): P("fsdp", "tensor", None),
           ("layer_0", "attn", "out", "kernel"): P("tensor", None, "fsdp"),
           ("layer_0", "mlp", "gate", "kernel"): P("fsdp", "tensor"),
           ("layer_0", "mlp", "down", "kernel"): P("tensor", "fsdp"),
           ("layer_0", "attn_norm", "scale"): P("fsdp")}
  # Shard shapes of [vocab 264, embed 64], [64, heads 4, 16], [4, 16, 64], [64, mlp 192], [192, 64], [64].
  shards = {(1, 8, 1): [(264, 8), (8, 4, 16), (4, 16, 8), (8, 192), (192, 8), (8,)],
            (8, 1, 1): [(264, 64), (64, 4, 16), (4, 16, 64), (64, 192), (192, 64), (64,)],
            (1, 4, 2): [(132, 16), (16, 2, 16), (2, 16, 16), (16, 96), (96, 16), (16,)]}
  get = lambda tree, path: tree[path[0]] if len(path) == 1 else get(tree[path[0]], path[1:])
  for axes, shapes in shards.items():
    _, _, state, _ = initialised(axes)
    mu, nu = state.opt_state[1][0].mu, state.opt_state[1][0].nu
    for (path, spec), shape in zip(specs.items(), shapes):
      leaf = get(state.params, path)
      assert leaf.sharding.spec == spec, (axes, path, leaf.sharding.spec)
      assert {s.data.shape for s in leaf.addressable_shards} == {shape}, (axes, path)
      assert get(mu, path).sharding == get(nu, path).sharding == leaf.sharding   # Adam state too
  # Data parallel: the batch is split 8 ways, a row per device.
  _, mesh, _, _ = initialised((8, 1, 1))
  batch = sharding_lib.put_batch(make_batch(0), mesh)
  assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(1, SEQ)}


def test_indivisible_sharding_names_the_parameter():
  config = tiny_config()                     # kv_heads = 2 cannot split 4 ways
  mesh = mesh_of(config, 2, 1, 4)
  with pytest.raises(ValueError, match=r"\['key'\]\['kernel'\].*'kv_heads'.*config.mesh"):
    sft.init(config, jax.random.key(0), mesh)


def _saved_activation_bytes(loss, params):
  """Bytes of the residuals the backward pass keeps, other than the params themselves."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(loss, params)
  total = 0
  for line in out.getvalue().splitlines():
    if "from the argument" in line:
      continue
    dtype, shape = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
    size = int(np.prod([int(d) for d in shape.split(",") if d])) if shape else 1
    total += size * {"f32": 4, "i32": 4, "bf16": 2, "bool": 1}[dtype]
  return total


def test_remat_policies_same_gradients_fewer_saved_activations():
  batch = {k: jnp.asarray(v) for k, v in make_batch(1).items()}
  layers, d, vocab = 2, 64, 264
  params = sft.init(tiny_config(num_layers=layers), jax.random.key(0),
                    mesh_of(tiny_config(), 1, 1, 1, jax.devices()[:1])).params
  grads, saved = {}, {}
  for remat in ("none", "dots", "full"):
    model = common.make_model(tiny_config(remat=remat, num_layers=layers))
    loss = lambda p: sft_objective.sft_loss(sft.logits_fn(model, p, batch), batch["tokens"],
                                            batch["loss_mask"])[0]
    grads[remat] = jax.jit(jax.value_and_grad(loss))(params)
    saved[remat] = _saved_activation_bytes(loss, params)
  for remat in ("dots", "full"):
    np.testing.assert_allclose(grads[remat][0], grads["none"][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads[remat][1], grads["none"][1])
  # none keeps every intermediate; dots also keeps the outputs of weight matmuls; full
  # keeps only each block's input [B, T, D] (and what the head and loss keep, ~[B, T, V]).
  assert saved["full"] < saved["dots"] < saved["none"], saved
  block_inputs, head = layers * BATCH * SEQ * d * 4, 3 * BATCH * SEQ * vocab * 4
  assert saved["full"] < 2 * block_inputs + head, saved
  assert saved["none"] > 10 * block_inputs, saved


def test_bfloat16_compute_float32_master_weights_through_sft():
  """dtype=bfloat16, param_dtype=float32: bf16 matmuls, f32 params and Adam state, close losses."""
  f32_config, mesh, init_state, f32_step = initialised((2, 2, 2))
  bf16_config = tiny_config(num_layers=1, dtype="bfloat16", param_dtype="float32")
  bf16_step = jit_step(bf16_config, init_state, mesh)    # the same f32 params and their shardings
  losses = {}
  with jax.set_mesh(mesh):
    batch = sharding_lib.put_batch(make_batch(2), mesh)
    hlo = bf16_step.lower(init_state, batch, jax.random.key(0)).as_text()
    dots = re.findall(r"stablehlo.dot_general.*", hlo)
    assert dots and all("xbf16>" in d.split("->")[-1] for d in dots), dots[:3]
    for name, step in (("float32", f32_step), ("bfloat16", bf16_step)):
      state, losses[name] = init_state, []
      for i in range(3):
        state, metrics = step(state, batch, jax.random.key(i))
        losses[name].append(float(metrics["loss"]))
      dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))}
      assert dtypes == {jnp.dtype("float32"), jnp.dtype("int32")}, dtypes   # int32: Adam's count
  assert all(np.isfinite(losses["bfloat16"]))
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
  assert losses["bfloat16"][-1] < losses["bfloat16"][0]                 # it learns
  assert losses["bfloat16"] != losses["float32"]                        # it is another computation


def test_restore_onto_other_meshes_gives_the_same_next_step(tmp_path):
  """Saved on 8x1x1; restored onto 2x2x2 and onto 1 device, onto a fresh state's shardings."""
  _, source, state, step = initialised((8, 1, 1))
  with jax.set_mesh(source):
    state, _ = step(state, sharding_lib.put_batch(make_batch(0), source), jax.random.key(0))
    mngr = checkpoint_lib.manager(str(tmp_path), keep=1)
    checkpoint_lib.save(mngr, 1, state, {"position": 1})
    _, metrics = step(state, sharding_lib.put_batch(make_batch(1), source), jax.random.key(1))
    expected = float(metrics["loss"])
    saved_params = jax.device_get(state.params)

  for target in ((2, 2, 2), (1, 1, 1)):
    _, mesh, like, target_step = initialised(target)    # step 0: the values restore replaces
    with jax.set_mesh(mesh):
      restored, data_state = checkpoint_lib.restore(mngr, 1, like)
      assert data_state == {"position": 1}
      assert (jax.tree.map(lambda x: x.sharding, restored)
              == jax.tree.map(lambda x: x.sharding, like))
      _, metrics = target_step(restored, sharding_lib.put_batch(make_batch(1), mesh),
                               jax.random.key(1))
    assert int(restored.step) == 1 and int(like.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), saved_params)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5, atol=1e-5,
                               err_msg=str(target))
