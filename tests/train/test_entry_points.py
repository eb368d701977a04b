"""Entry points refuse to damage a run and name what they could not find."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import example
from experiments import convert
from rlhf_jax.interop import hf
from rlhf_jax.interop import hf_config
from rlhf_jax.model import transformer
from rlhf_jax.stages import example as example_stage
from rlhf_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_GPT2 = dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                 n_positions=32, activation_function="gelu_new", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("runs") / "trained")
  loop.train(example.get_config(), workdir, example_stage)
  return workdir


def snapshot(workdir):
  return {os.path.relpath(os.path.join(root, f), workdir): os.path.getsize(os.path.join(root, f))
          for root, _, files in os.walk(workdir) for f in files}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny GPT-2 directory written by our exporter (zeros: only the files matter here)."""
  model_config = hf_config.model_config_from_hf(TINY_GPT2)
  model = transformer.Transformer(transformer.TransformerConfig.from_dict(model_config))
  tokens = jnp.zeros((1, 4), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens, tokens, tokens))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])
  out = str(tmp_path_factory.mktemp("hf") / "gpt2")
  hf.save_hf(params, model_config, out, model_type="gpt2")
  return out


def test_convert_refuses_to_import_into_an_existing_run(trained_run, hf_dir, tmp_path):
  before = snapshot(trained_run)
  config_json = open(os.path.join(trained_run, "config.json")).read()
  with pytest.raises(FileExistsError, match=r"--to=.*trained.* is not empty .*--overwrite"):
    convert.hf_to_checkpoint(hf_dir, trained_run)
  assert snapshot(trained_run) == before
  assert open(os.path.join(trained_run, "config.json")).read() == config_json
  imported = str(tmp_path / "imported")           # a new directory, or --overwrite, is fine
  convert.hf_to_checkpoint(hf_dir, imported)
  convert.hf_to_checkpoint(hf_dir, imported, overwrite=True)
  assert os.listdir(os.path.join(imported, "checkpoints")) == ["0"]


def test_evaluate_policy_names_the_missing_reference(trained_run, tmp_path):
  # A subprocess, as a user runs it: entry points define absl flags at import, so two of
  # them (e.g. plot_curves' and evaluate_policy's --out) cannot share a test process.
  missing = str(tmp_path / "no_such_run")
  for policy, reference, named in ((trained_run, missing, "reference"),
                                   (missing, trained_run, "policy")):
    run = subprocess.run([sys.executable, "-m", "experiments.evaluate_policy",
                          f"--policy={policy}", f"--reference={reference}"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1, run.stderr
    assert f"--{named}='{missing}': no such run" in run.stderr, run.stderr
