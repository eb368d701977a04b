"""Entry points refuse to damage a run and name what they could not find."""

import os

import pytest

from configs import example
from experiments import convert
from experiments import evaluate_policy
from rlhf_jax.stages import example as example_stage
from rlhf_jax.train import loop


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("runs") / "trained")
  loop.train(example.get_config(), workdir, example_stage)
  return workdir


def snapshot(workdir):
  return {os.path.relpath(os.path.join(root, f), workdir): os.path.getsize(os.path.join(root, f))
          for root, _, files in os.walk(workdir) for f in files}


def test_convert_refuses_to_import_into_an_existing_run(trained_run, tmp_path):
  before = snapshot(trained_run)
  config_json = open(os.path.join(trained_run, "config.json")).read()
  with pytest.raises(FileExistsError, match=r"--to=.*trained.* is not empty .*--overwrite"):
    convert.hf_to_checkpoint(str(tmp_path / "some_hf_model"), trained_run)
  assert snapshot(trained_run) == before
  assert open(os.path.join(trained_run, "config.json")).read() == config_json


def test_evaluate_policy_names_the_missing_reference(trained_run, tmp_path):
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match=f"--reference='{missing}': no such run"):
    evaluate_policy.evaluate(trained_run, missing)
  with pytest.raises(FileNotFoundError, match=f"--policy='{missing}': no such run"):
    evaluate_policy.evaluate(missing, trained_run)
