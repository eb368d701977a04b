r"""Converts between Hugging Face directories and our Orbax checkpoints.

  python -m experiments.convert --from_hf=/models/llama --to=/tmp/llama_ckpt [--max_len=2048]
  python -m experiments.convert --from_ckpt=/tmp/sft --to_hf=/tmp/sft_hf [--config=configs/sft.py]

`--to` is written as a workdir: `checkpoints/0/state` holds `{'params': ...}`
(what `rlhf_jax.train.checkpoint.load_params`, hence `config.init.checkpoint`,
reads), `config.json` the resolved config with the imported `config.model`, and
`hf_assets/` the source config.json and tokenizer files; a non-empty `--to` (a training
run's workdir, say) is refused unless `--overwrite`. The reverse direction
reads `config.model` from `--config`, else from the workdir's `config.json`, and
copies `hf_assets/` tokenizer files and token ids when present.
"""

import json
import os
import shutil
import sys

from absl import app
from absl import flags
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags

from configs import base
from rlhf_jax.interop import hf
from rlhf_jax.model import transformer
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import sharding as sharding_lib

ASSETS = "hf_assets"
_ASSET_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional configs/<stage>.py: mesh, sharding rules and, for --from_ckpt, "
    "config.model (default: configs/base.py, and the workdir's config.json).")
_FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face directory to import.")
_TO = flags.DEFINE_string("to", None, "Workdir to write the imported checkpoint into.")
_FROM_CKPT = flags.DEFINE_string("from_ckpt", None, "Workdir, checkpoints/ or step folder.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Hugging Face directory to write.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "config.model.max_len of the import "
                                "(default: max_position_embeddings).")
_MODEL_TYPE = flags.DEFINE_enum("model_type", None, list(hf.SUPPORTED_MODEL_TYPES),
                                "HF architecture to export as (default: inferred).")
_HEAD = flags.DEFINE_enum("head", "auto", ["auto", "lm", "scalar"], "Head to export.")
_DTYPE = flags.DEFINE_string("dtype", None, "Exported tensor dtype (default: param_dtype).")
_DROP_BIAS = flags.DEFINE_bool("drop_scalar_bias", False, "Export a reward model whose scalar "
                               "head has a nonzero bias (HF's score has none).")
_SHARD = flags.DEFINE_integer("max_shard_bytes", 2 << 30, "Largest safetensors file.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Let --to be a non-empty directory (its "
                               "checkpoints and config.json are replaced).")


def _write_json(path: str, obj) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def hf_to_checkpoint(hf_dir: str, workdir: str, config: ml_collections.ConfigDict | None = None,
                     max_len: int | None = None, overwrite: bool = False
                     ) -> ml_collections.ConfigDict:
  """Imports `hf_dir` into `workdir`; returns the config written to workdir/config.json.

  A non-empty `workdir` (a training run, say) is refused unless `overwrite`, which first
  removes its checkpoints.
  """
  if os.path.isdir(workdir) and os.listdir(workdir):
    if not overwrite:
      held = ", ".join(sorted(os.listdir(workdir))[:5])
      raise FileExistsError(f"--to={workdir!r} is not empty (it holds {held}); choose a new "
                            "directory, or pass --overwrite to replace its checkpoints and "
                            "config.json")
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  config = base.get_config() if config is None else ml_collections.ConfigDict(config.to_dict())
  mesh = sharding_lib.make_mesh(config.mesh)
  result = hf.load_hf(hf_dir, mesh, sharding_lib.rules(config), max_len=max_len,
                      dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                      remat=config.model.remat)
  os.makedirs(workdir, exist_ok=True)
  mngr = checkpoint_lib.manager(workdir, keep=1)
  checkpoint_lib.save(mngr, 0, {"params": result.params}, {})
  mngr.close()
  assets = os.path.join(workdir, ASSETS)
  os.makedirs(assets, exist_ok=True)
  for name in _ASSET_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(assets, name))
  config.model = ml_collections.ConfigDict(result.model_config)
  if result.tokenizer_path:
    config.tokenizer.kind = "json"
    config.tokenizer.path = os.path.join(os.path.abspath(assets), "tokenizer.json")
  config.init.hf_dir = ""
  config.init.checkpoint = ""
  _write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  return config


def _find_upwards(path: str, name: str) -> str | None:
  """`name` in `path` or the nearest folder above it (a step dir sits two below)."""
  path = os.path.abspath(path)
  for _ in range(4):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
    if os.path.isdir(os.path.join(path, name)):
      return os.path.join(path, name)
    path = os.path.dirname(path)
  return None


def checkpoint_to_hf(ckpt: str, hf_dir: str, config: ml_collections.ConfigDict | None = None,
                     **save_kwargs) -> list:
  """Exports the params of an Orbax checkpoint as an HF directory; see `hf.save_hf`."""
  if config is None:
    path = _find_upwards(ckpt, "config.json")
    if path is None:
      raise FileNotFoundError(f"{ckpt}: no config.json in the workdir; pass --config")
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  model_cfg = transformer.TransformerConfig.from_dict(config.model)
  mesh = sharding_lib.make_mesh(config.mesh)
  axis_rules = sharding_lib.rules(config)
  model = transformer.Transformer(model_cfg, heads=("lm", "scalar"))
  tokens = jax.numpy.zeros((1, 8), jax.numpy.int32)
  with nn.logical_axis_rules(axis_rules):
    abstract = jax.eval_shape(lambda r: model.init(r, tokens, tokens, tokens + 1)["params"],
                              jax.random.key(0))
    shardings = sharding_lib.logical_shardings(abstract, mesh, axis_rules)
  like = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.meta.unbox(abstract), shardings)
  params = checkpoint_lib.load_params(ckpt, like)
  # Heads the checkpoint lacks (the LM head of a reward model, say) stay abstract: drop them.
  params = {k: v for k, v in params.items()
            if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(v))}
  assets = _find_upwards(ckpt, ASSETS)
  extra = {}
  if assets:
    src_cfg = os.path.join(assets, "config.json")
    if os.path.isfile(src_cfg):
      with open(src_cfg) as f:
        src = json.load(f)
      extra = {k: src[k] for k in _TOKEN_IDS if k in src}
      if src.get("model_type") in hf.SUPPORTED_MODEL_TYPES:
        save_kwargs.setdefault("model_type", src["model_type"])
  save_kwargs = {k: v for k, v in save_kwargs.items() if v is not None}
  files = hf.save_hf(params, config.model, hf_dir, extra_config=extra, **save_kwargs)
  if assets:
    for name in _ASSET_FILES[1:]:
      if os.path.isfile(os.path.join(assets, name)):
        shutil.copyfile(os.path.join(assets, name), os.path.join(hf_dir, name))
  return files


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_FROM_HF.value) == bool(_FROM_CKPT.value):
    raise app.UsageError("pass exactly one of --from_hf (with --to) or --from_ckpt (with --to_hf)")
  if _FROM_HF.value:
    if not _TO.value:
      raise app.UsageError("--from_hf needs --to")
    try:
      config = hf_to_checkpoint(_FROM_HF.value, _TO.value, _CONFIG.value, _MAX_LEN.value,
                                overwrite=_OVERWRITE.value)
    except FileExistsError as e:
      sys.exit(f"convert: error: {e}")
    print(json.dumps({"checkpoint": os.path.abspath(_TO.value),
                      "model": config.model.to_dict()}, sort_keys=True))
  else:
    if not _TO_HF.value:
      raise app.UsageError("--from_ckpt needs --to_hf")
    files = checkpoint_to_hf(_FROM_CKPT.value, _TO_HF.value, _CONFIG.value,
                             model_type=_MODEL_TYPE.value, head=_HEAD.value, dtype=_DTYPE.value,
                             drop_scalar_bias=_DROP_BIAS.value,
                             max_shard_bytes=_SHARD.value)
    print(json.dumps({"hf_dir": os.path.abspath(_TO_HF.value), "files": files}))


if __name__ == "__main__":
  app.run(main)
