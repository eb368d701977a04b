"""HF import / export: logits and greedy generation against transformers (torch CPU),
bitwise round trips, sharded checkpoints, loading onto a (1, 4, 2) mesh with one
tensor on the host at a time, and the errors.

Tests that need torch + transformers (the `hf` extra) skip without them, except under
CI=true, where they fail so CI cannot skip the parity silently; the rest build their
checkpoints with our own exporter.
"""

import json
import os
import shutil
import time
import weakref

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from configs import base
from experiments import convert
from rlhf_jax.interop import hf, hf_config, hf_weights
from rlhf_jax.model import sampling
from rlhf_jax.model import transformer as tr
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import sharding as sharding_lib

RULES = sharding_lib.rules(base.get_config())
VOCAB, BOS, EOS, PAD = 128, 1, 2, 0
# Tiny HF configs: GQA and head_dim != hidden / heads (Llama), one KV head and tied
# embeddings with an unused sliding window (Mistral), q/k/v biases (Qwen2), GPT-2.
HF_CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=24, max_position_embeddings=64, rope_theta=5000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", vocab_size=VOCAB, hidden_size=64,
                    intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=64, sliding_window=4096,
                    tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                 n_positions=64, activation_function="gelu_new", tie_word_embeddings=True),
}
TOKEN_IDS = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def single_mesh():
  return sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                jax.devices()[:1])


def mesh_142():
  return sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))


def flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def random_params(model_config, heads=("lm",), seed=0):
  """Every leaf random, norm scales near 1, on one device."""
  model = tr.Transformer(tr.TransformerConfig.from_dict(model_config), heads)
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens, tokens,
                                   tokens)["params"])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape)
    return jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + 0.1 * noise, leaf.dtype)

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


def our_config(name, **overrides):
  return dict(hf_config.model_config_from_hf(HF_CONFIGS[name]), **overrides)


def write_ours(tmp_path, name, seed=0, **save_kwargs):
  """An HF directory written by our exporter from random params: (dir, model, params)."""
  mc = our_config(name)
  model, params = random_params(mc, seed=seed)
  out = str(tmp_path / f"{name}_ours")
  hf.save_hf(params, mc, out, model_type=name, extra_config=TOKEN_IDS, **save_kwargs)
  return out, model, params


def assert_trees_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def left_padded(seed, batch_lengths, seq):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, size=(len(batch_lengths), seq)).astype(np.int32)
  mask = (np.arange(seq)[None] >= seq - np.array(batch_lengths)[:, None]).astype(np.int32)
  tokens = np.where(mask == 1, tokens, PAD).astype(np.int32)
  return tokens, mask, np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)


# ----------------------------------------------------------------------------------------
# Against transformers.

def import_hf(module):
  """Imports torch or transformers; skips without the `hf` extra, fails under CI=true."""
  if os.environ.get("CI", "").lower() != "true":
    return pytest.importorskip(module)
  try:
    return __import__(module)
  except ImportError as e:
    pytest.fail(f"CI=true needs the hf extra (pip install -e '.[test,hf]'): {e}")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """name -> (torch model, HF dir), made on first use: every parameter random."""
  import_hf("transformers")
  torch = import_hf("torch")
  import transformers   # pylint: disable=g-import-not-at-top
  cache = {}

  def get(name):
    if name not in cache:
      cfg = dict(HF_CONFIGS[name])
      config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg, **TOKEN_IDS)
      torch.manual_seed(0)
      model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
      randomize(model, torch)
      path = str(tmp_path_factory.mktemp(name))
      model.save_pretrained(path)
      cache[name] = (model.eval(), path)
    return cache[name]

  return get


def randomize(model, torch, seed=0):
  """Norm weights 1 + noise, everything else (biases too) noise, so every tensor matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      norm = ("norm" in name or "ln_" in name) and name.endswith("weight")
      p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if norm else 0.0))


def torch_logits(model, tokens, mask, positions):
  import torch   # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.numpy()


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_and_greedy_generation_match_transformers(hf_models, name):
  import torch   # pylint: disable=g-import-not-at-top
  torch_model, path = hf_models(name)
  result = hf.load_hf(path, single_mesh(), RULES)
  assert result.model_config == our_config(name) and result.heads == ("lm",)
  model = tr.Transformer(tr.TransformerConfig.from_dict(result.model_config))

  tokens, mask, positions = left_padded(0, [12, 9], 12)
  ours = np.asarray(jax.jit(model.apply)({"params": result.params}, tokens, positions, mask)[0][
      "logits"])
  theirs = torch_logits(torch_model, tokens, mask, positions)
  real = mask == 1
  assert np.abs(theirs[real]).max() > 1.0     # not a trivially small comparison
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)

  prompt, prompt_mask, _ = left_padded(1, [6, 4], 6)
  out = sampling.sample(result.params, model, prompt, prompt_mask, jax.random.key(0),
                        max_new_tokens=20, greedy=True, eos_id=EOS, pad_id=PAD)
  with torch.no_grad():
    generated = torch_model.generate(
        input_ids=torch.tensor(prompt, dtype=torch.long),
        attention_mask=torch.tensor(prompt_mask, dtype=torch.long), max_new_tokens=20,
        do_sample=False, eos_token_id=EOS,
        pad_token_id=PAD).numpy()[:, 6:]
  expected = np.full((2, 20), PAD)
  expected[:, :generated.shape[1]] = generated
  np.testing.assert_array_equal(np.asarray(out.response_tokens), expected)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_export_loads_in_transformers_with_identical_weights(hf_models, tmp_path, name):
  import torch   # pylint: disable=g-import-not-at-top
  import transformers   # pylint: disable=g-import-not-at-top
  torch_model, path = hf_models(name)
  result = hf.load_hf(path, single_mesh(), RULES)
  out = str(tmp_path / "export")
  hf.save_hf(result.params, result.model_config, out, model_type=name, extra_config=TOKEN_IDS)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(reloaded) is type(torch_model)
  want, got = torch_model.state_dict(), reloaded.state_dict()
  assert want.keys() == got.keys()
  for k in want:
    assert torch.equal(want[k], got[k]), k
  tokens, mask, positions = left_padded(2, [10, 10], 10)
  np.testing.assert_array_equal(torch_logits(reloaded, tokens, mask, positions),
                                torch_logits(torch_model, tokens, mask, positions))
  # import -> export -> import is bitwise.
  assert_trees_equal(hf.load_hf(out, single_mesh(), RULES).params, result.params)


def test_transformers_sharded_checkpoint_loads_onto_mesh(hf_models, tmp_path):
  torch_model, path = hf_models("llama")
  sharded = str(tmp_path / "sharded")
  torch_model.save_pretrained(sharded, max_shard_size="40KB")
  assert os.path.isfile(os.path.join(sharded, hf_weights.INDEX_FILE))
  assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 3
  mesh = mesh_142()
  result = hf.load_hf(sharded, mesh, RULES)
  assert_trees_equal(result.params, hf.load_hf(path, single_mesh(), RULES).params)
  query = result.params["layer_0"]["attn"]["query"]["kernel"]
  assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len(query.addressable_shards) == 8
  assert query.addressable_shards[0].data.shape == (16, 2, 24)


def test_sequence_classification_round_trip(hf_models, tmp_path):
  """HF reward model -> our scalar head (bias 0) -> HF again; scores match transformers."""
  import torch   # pylint: disable=g-import-not-at-top
  import transformers   # pylint: disable=g-import-not-at-top
  del hf_models   # only for the skip
  cfg = dict(HF_CONFIGS["llama"])
  config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg, **TOKEN_IDS,
                                             num_labels=1)
  torch.manual_seed(0)
  rm = transformers.AutoModelForSequenceClassification.from_config(
      config, attn_implementation="eager")
  randomize(rm, torch, seed=1)
  src = str(tmp_path / "rm")
  rm.save_pretrained(src)
  result = hf.load_hf(src, single_mesh(), RULES)
  assert result.heads == ("scalar",)
  assert float(result.params["scalar_head"]["bias"][0]) == 0.0
  model = tr.Transformer(tr.TransformerConfig.from_dict(result.model_config), ("scalar",))
  tokens = np.random.default_rng(3).integers(3, VOCAB, (3, 9)).astype(np.int32)
  ones = np.ones_like(tokens)
  positions = np.broadcast_to(np.arange(9, dtype=np.int32), tokens.shape)
  ours = np.asarray(jax.jit(model.apply)({"params": result.params}, tokens, positions, ones)[0][
      "scalar"])
  with torch.no_grad():
    theirs = rm(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours[:, -1], theirs[:, 0], atol=1e-4, rtol=0)

  out = str(tmp_path / "rm_out")
  hf.save_hf(result.params, result.model_config, out, extra_config=TOKEN_IDS)
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out)
  assert reloaded.config.architectures == ["LlamaForSequenceClassification"]
  assert reloaded.config.num_labels == 1
  for k, v in rm.state_dict().items():
    assert torch.equal(v, reloaded.state_dict()[k]), k


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_reward_export_bias(tmp_path, name):
  """A zero bias exports as is; a nonzero one is refused unless dropped, then read back."""
  mc = our_config(name)
  _, params = random_params(mc, heads=("scalar",), seed=4)
  with pytest.raises(ValueError, match="scalar_head/bias"):
    hf.save_hf(params, mc, str(tmp_path / "refused"))
  hf.save_hf(params, mc, str(tmp_path / "rm"), drop_scalar_bias=True, extra_config=TOKEN_IDS)
  cfg = hf_config.read_config(str(tmp_path / "rm"))
  assert cfg["architectures"] == [hf_config.SEQUENCE_CLASSIFICATION[name]]
  back = hf.load_hf(str(tmp_path / "rm"), single_mesh(), RULES)
  assert back.heads == ("scalar",)
  assert_trees_equal(back.params, params)
  zero = dict(params, scalar_head=dict(params["scalar_head"], bias=jnp.zeros((1,))))
  hf.save_hf(zero, mc, str(tmp_path / "zero"), extra_config=TOKEN_IDS)
  assert hf_config.SCORE_BIAS_KEY not in hf_config.read_config(str(tmp_path / "zero"))
  transformers = import_hf("transformers")
  torch = import_hf("torch")
  rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "zero"))
  model = tr.Transformer(tr.TransformerConfig.from_dict(mc), ("scalar",))
  tokens = np.random.default_rng(5).integers(3, VOCAB, (2, 7)).astype(np.int32)
  positions = np.broadcast_to(np.arange(7, dtype=np.int32), tokens.shape)
  ours = jax.jit(model.apply)({"params": zero}, tokens, positions, np.ones_like(tokens))[0][
      "scalar"]
  with torch.no_grad():
    theirs = rm(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours)[:, -1], theirs[:, 0], atol=1e-4, rtol=0)


def test_bfloat16_export(tmp_path):
  path, _, params = write_ours(tmp_path, "qwen2", dtype="bfloat16")
  tensors = load_file(os.path.join(path, hf_weights.SINGLE_FILE))
  assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
  back = hf.load_hf(path, single_mesh(), RULES).params      # cast to float32 on load
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  assert_trees_equal(back, rounded)
  transformers = import_hf("transformers")
  import_hf("torch")
  model = transformers.AutoModelForCausalLM.from_pretrained(path)
  assert str(model.dtype) == "torch.bfloat16"


# ----------------------------------------------------------------------------------------
# Without torch: our own exporter makes the checkpoints.

@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_export_import_is_bitwise(tmp_path, name):
  path, _, params = write_ours(tmp_path, name)
  back = hf.load_hf(path, single_mesh(), RULES)
  assert back.model_config == our_config(name)
  assert_trees_equal(back.params, params)
  first = load_file(os.path.join(path, hf_weights.SINGLE_FILE))
  again = str(tmp_path / "again")
  hf.save_hf(back.params, back.model_config, again, model_type=name)
  second = load_file(os.path.join(again, hf_weights.SINGLE_FILE))
  assert first.keys() == second.keys()
  assert all(np.array_equal(first[k], second[k]) for k in first)


def test_layouts_against_hand_mapping(tmp_path):
  """Our export's HF tensors are the hand-written transposes/reshapes of our leaves."""
  path, _, params = write_ours(tmp_path, "llama")
  t = load_file(os.path.join(path, hf_weights.SINGLE_FILE))
  p = jax.tree.map(np.asarray, params)["layer_1"]
  q = p["attn"]["query"]["kernel"]                                  # [E, H, Dh]
  np.testing.assert_array_equal(t["model.layers.1.self_attn.q_proj.weight"],
                                q.reshape(64, 4 * 24).T)
  o = p["attn"]["out"]["kernel"]                                    # [H, Dh, E]
  head3 = t["model.layers.1.self_attn.o_proj.weight"][:, 3 * 24:4 * 24]
  np.testing.assert_array_equal(head3, o[3].T)
  np.testing.assert_array_equal(t["model.layers.1.mlp.down_proj.weight"],
                                p["mlp"]["down"]["kernel"].T)
  np.testing.assert_array_equal(t["lm_head.weight"], np.asarray(params["lm_head"]["kernel"]).T)

  gpath, _, gparams = write_ours(tmp_path, "gpt2")
  g = load_file(os.path.join(gpath, hf_weights.SINGLE_FILE))
  attn = jax.tree.map(np.asarray, gparams)["layer_0"]["attn"]
  c_attn = g["transformer.h.0.attn.c_attn.weight"]                  # Conv1D [E, 3E]
  np.testing.assert_array_equal(c_attn[:, 64:128], attn["key"]["kernel"].reshape(64, 64))
  np.testing.assert_array_equal(g["transformer.h.0.attn.c_attn.bias"][128:],
                                attn["value"]["bias"].reshape(-1))
  assert "lm_head.weight" not in g                                  # tied


def test_our_sharded_export_loads_onto_mesh(tmp_path):
  path, model, params = write_ours(tmp_path, "llama", max_shard_bytes=60_000)
  with open(os.path.join(path, hf_weights.INDEX_FILE)) as f:
    weight_map = json.load(f)["weight_map"]
  assert len(set(weight_map.values())) > 3
  assert not os.path.exists(os.path.join(path, hf_weights.SINGLE_FILE))
  mesh = mesh_142()
  # Onto an existing sharded tree (what stages/common.py passes).
  with nn.logical_axis_rules(RULES):
    boxed = jax.eval_shape(lambda r: tr.init_params(model, r),
                           jax.random.key(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh, RULES)
  _, other = random_params(our_config("llama"), seed=7)
  loaded = hf.load_params_into(path, jax.device_put(other, shardings))
  assert_trees_equal(loaded, params)
  for leaf, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings)):
    assert leaf.sharding == want
  embed = loaded["embed"]["embedding"]
  assert embed.addressable_shards[0].data.shape == (VOCAB // 2, 64 // 4)
  # An export after a larger one leaves no stale shard behind.
  hf.save_hf(params, our_config("llama"), path)
  assert sorted(f for f in os.listdir(path) if "safetensors" in f) == [hf_weights.SINGLE_FILE]


def test_new_heads_keep_their_values(tmp_path):
  path, _, params = write_ours(tmp_path, "mistral")
  mc = our_config("mistral", tie_embeddings=False)   # untied head starts as the embedding
  _, like = random_params(mc, heads=("lm", "scalar"), seed=9)
  loaded = hf.load_params_into(path, like)
  np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["embed"]["embedding"].T)
  assert_trees_equal(loaded["scalar_head"], like["scalar_head"])
  assert_trees_equal(loaded["layer_1"], params["layer_1"])
  # load_hf initialises only what the checkpoint lacks, onto its sharding.
  lpath, _, lparams = write_ours(tmp_path, "llama")
  result = hf.load_hf(lpath, mesh_142(), RULES, heads=("lm", "scalar"))
  head = result.params["scalar_head"]
  assert np.std(np.asarray(head["kernel"])) > 0 and float(head["bias"][0]) == 0.0
  assert head["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert_trees_equal({k: v for k, v in result.params.items() if k != "scalar_head"}, lparams)


def test_convert_round_trip(tmp_path):
  path, _, params = write_ours(tmp_path, "gpt2")
  shutil.copyfile(os.path.join(path, "config.json"), os.path.join(path, "tokenizer.json"))
  ckpt = str(tmp_path / "ckpt")
  config = convert.hf_to_checkpoint(path, ckpt)
  with open(os.path.join(ckpt, "config.json")) as f:
    written = json.load(f)
  assert written["model"] == our_config("gpt2")
  assert config.tokenizer.kind == "json" and os.path.isfile(config.tokenizer.path)
  # What config.init.checkpoint reads.
  _, other = random_params(our_config("gpt2"), seed=7)
  assert_trees_equal(checkpoint_lib.load_params(ckpt, other), params)
  out = str(tmp_path / "hf_again")
  assert convert.checkpoint_to_hf(ckpt, out) == [hf_weights.SINGLE_FILE]
  first = load_file(os.path.join(path, hf_weights.SINGLE_FILE))
  second = load_file(os.path.join(out, hf_weights.SINGLE_FILE))
  assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)
  assert hf_config.read_config(out) == hf_config.read_config(path)
  assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_gpt2_position_table_may_be_truncated(tmp_path):
  path, _, params = write_ours(tmp_path, "gpt2")
  short = hf.load_hf(path, single_mesh(), RULES, max_len=16)
  assert short.model_config["max_len"] == 16
  np.testing.assert_array_equal(short.params["pos_embed"]["embedding"],
                                np.asarray(params["pos_embed"]["embedding"])[:16])
  with pytest.raises(ValueError, match="n_positions=64"):
    hf.load_hf(path, single_mesh(), RULES, max_len=65)


# ----------------------------------------------------------------------------------------
# Errors.

def rewrite_config(path, **changes):
  cfg = hf_config.read_config(path)
  cfg.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


@pytest.mark.parametrize("name, changes, match", [
    ("llama", dict(model_type="falcon"), "model_type 'falcon' is not supported"),
    ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
     "rope_parameters.rope_type='yarn'"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("llama", dict(attention_bias=True), "attention_bias=True with mlp_bias=False"),
    ("mistral", dict(sliding_window=16), "sliding_window=16"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
     "sliding_window=8"),
    ("gpt2", dict(activation_function="gelu"), "activation_function='gelu'"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])
def test_unsupported_configs_name_the_field(tmp_path, name, changes, match):
  path, _, _ = write_ours(tmp_path, name)
  rewrite_config(path, **changes)
  with pytest.raises(ValueError, match=match):
    hf.load_hf(path, single_mesh(), RULES)


def test_sliding_window_is_fine_when_sequences_fit(tmp_path):
  path, _, params = write_ours(tmp_path, "mistral")
  rewrite_config(path, sliding_window=16)
  result = hf.load_hf(path, single_mesh(), RULES, max_len=16)
  assert result.model_config["max_len"] == 16
  assert_trees_equal(result.params, params)


def shard_of(weight_map):
  return weight_map["model.embed_tokens.weight"]


def test_missing_shard_and_missing_tensor(tmp_path):
  path, _, params = write_ours(tmp_path, "llama", max_shard_bytes=60_000)
  with open(os.path.join(path, hf_weights.INDEX_FILE)) as f:
    weight_map = json.load(f)["weight_map"]
  index = os.path.join(path, hf_weights.INDEX_FILE)
  with open(index, "w") as f:
    json.dump({"weight_map": dict(weight_map, **{"model.extra.weight": shard_of(weight_map)})}, f)
  with pytest.raises(ValueError, match="'model.extra.weight' is listed in 'model-00001-of-"):
    hf.load_params_into(path, params)
  shard = weight_map["model.layers.1.mlp.up_proj.weight"]
  os.remove(os.path.join(path, shard))
  with pytest.raises(FileNotFoundError, match=f"shard '{shard}' is missing"):
    hf.load_params_into(path, params)

  path, _, params = write_ours(tmp_path, "qwen2")
  file = os.path.join(path, hf_weights.SINGLE_FILE)
  tensors = load_file(file)
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"HF tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"
                     r" \(for params/layer_1/attn/key/bias\) is missing"):
    hf.load_params_into(path, params)
  os.remove(file)
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    hf.load_params_into(path, params)


def test_shape_mismatches_name_tensor_and_shapes(tmp_path):
  path, _, _ = write_ours(tmp_path, "llama")
  _, wide = random_params(our_config("llama", mlp_dim=128))
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' of shape "
                     r"\(96, 64\) maps to shape \(64, 96\), but params/layer_0/mlp/gate/kernel "
                     r"has shape \(64, 128\)"):
    hf.load_params_into(path, wide)
  # Same number of q outputs, split differently: heads matter for RoPE, so refused.
  _, resplit = random_params(our_config("llama", num_heads=2, num_kv_heads=1, head_dim=48))
  with pytest.raises(ValueError, match=r"q_proj\.weight' of shape \(96, 64\) maps to shape "
                     r"\(64, 4, 24\), but params/layer_0/attn/query/kernel has shape \(64, 2, 48\)"):
    hf.load_params_into(path, resplit)
  # A checkpoint inconsistent with its own config.json.
  rewrite_config(path, intermediate_size=80)
  _, narrow = random_params(our_config("llama", mlp_dim=80))
  with pytest.raises(ValueError, match=r"gate_proj\.weight' has shape \(96, 64\), but "
                     r"config.json implies \(80, 64\)"):
    hf.load_params_into(path, narrow)


def test_config_mismatches_are_refused(tmp_path):
  path, _, _ = write_ours(tmp_path, "qwen2")
  _, no_bias = random_params(our_config("qwen2", qkv_bias=False))
  with pytest.raises(ValueError, match=r"HF tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' "
                     "has no counterpart"):
    hf.load_params_into(path, no_bias)
  _, extra_bias = random_params(our_config("qwen2", use_bias=True))
  with pytest.raises(ValueError, match=r"params/layer_0/attn/out/bias has no HF tensor"):
    hf.load_params_into(path, extra_bias)
  lpath, _, _ = write_ours(tmp_path, "llama")                       # untied lm_head
  _, tied = random_params(our_config("llama", tie_embeddings=True))
  with pytest.raises(ValueError, match="tie_embeddings=False"):
    hf.load_params_into(lpath, tied)


def test_unexportable_configs_name_the_field(tmp_path):
  mc = our_config("llama", norm="layer")
  _, params = random_params(mc)
  with pytest.raises(ValueError, match=r"config.model.norm='layer'"):
    hf.save_hf(params, mc, str(tmp_path / "x"))
  mc = our_config("qwen2")
  _, params = random_params(mc)
  with pytest.raises(ValueError, match=r"config.model.qkv_bias=True: Mistral has no biases"):
    hf.save_hf(params, mc, str(tmp_path / "x"), model_type="mistral")
  with pytest.raises(ValueError, match="model_type 'opt' is not supported"):
    hf.save_hf(params, mc, str(tmp_path / "x"), model_type="opt")


# ----------------------------------------------------------------------------------------
# Host memory of a sharded load.

def _status_kb(key):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1])
  raise KeyError(key)


def test_sharded_load_holds_one_tensor_on_host(tmp_path, monkeypatch, record_property):
  """A ~370 MB checkpoint onto (data=1, fsdp=4, tensor=2): at most one HF tensor alive.

  Reading everything first would need the loaded params plus the whole checkpoint
  on the host; the loader needs them plus about two of its largest tensor (the
  numpy copy and, while the file is open, its memory-mapped pages).
  """
  mc = dict(our_config("llama"), vocab_size=8192, embed_dim=1024, num_layers=6, num_heads=8,
            num_kv_heads=8, head_dim=128, mlp_dim=2816, tie_embeddings=False)
  cfg = hf_config.hf_config_from_model(mc)
  arch = hf_config.architecture(cfg)
  maps = hf_weights.trunk_maps(arch, "model.") + [hf_weights.lm_head_map(arch)]
  path = str(tmp_path / "big")
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  rng = np.random.default_rng(0)
  weight_map, sizes = {}, {}
  for i, part in enumerate((maps[:len(maps) // 2], maps[len(maps) // 2:])):
    name = f"model-{i + 1:05d}-of-00002.safetensors"
    tensors = {m.hf: rng.standard_normal(m.hf_shape, np.float32) for m in part}
    save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
    sizes.update({k: v.nbytes for k, v in tensors.items()})
    del tensors
  with open(os.path.join(path, hf_weights.INDEX_FILE), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  total, largest = sum(sizes.values()), max(sizes.values())
  assert total > 300e6

  live = {"now": 0, "peak": 0, "reads": 0}
  read = hf_weights.read_tensor

  def tracked(*args, **kwargs):
    arr = read(*args, **kwargs)
    live["now"] += arr.nbytes
    live["reads"] += 1
    live["peak"] = max(live["peak"], live["now"])
    weakref.finalize(arr, lambda n=arr.nbytes: live.__setitem__("now", live["now"] - n))
    return arr

  monkeypatch.setattr(hf_weights, "read_tensor", tracked)
  with open("/proc/self/clear_refs", "w") as f:    # resets VmHWM (peak RSS)
    f.write("5")
  before = _status_kb("VmRSS") * 1024
  start = time.time()
  result = hf.load_hf(path, mesh_142(), RULES)
  jax.block_until_ready(result.params)
  seconds = time.time() - start
  peak_rss = _status_kb("VmHWM") * 1024 - before
  held = sum(x.nbytes for x in jax.tree.leaves(result.params))   # on CPU, devices are host RAM
  report = (f"checkpoint {total / 2**20:.0f} MiB (largest tensor {largest / 2**20:.0f} MiB), "
            f"load {seconds:.1f} s: peak live HF tensors {live['peak'] / 2**20:.0f} MiB; "
            f"peak RSS growth {peak_rss / 2**20:.0f} MiB = loaded params "
            f"{held / 2**20:.0f} MiB + {(peak_rss - held) / 2**20:.0f} MiB")
  print(report)
  record_property("memory", report)
  assert live["reads"] == len(maps) and live["peak"] == largest
  assert held == total
  assert peak_rss - held < total / 2
  for k, m in list({m.hf: m for m in maps}.items())[:3]:
    leaf = traverse(result.params, m.ours)
    assert len(leaf.addressable_shards) == 8
    np.testing.assert_array_equal(
        np.asarray(leaf), m.to_ours(hf_weights.read_tensor(os.path.join(
            path, weight_map[k]), k)))


def traverse(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree
