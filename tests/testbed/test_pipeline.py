"""rlhf_jax.testbed.pipeline's pure parts: best-of-n's pick on hand-made proxy scores."""

import numpy as np

from rlhf_jax.testbed import pipeline


def test_best_of_n_picks_each_prompts_highest_proxy_score():
  # 3 prompts x 4 samples, prompt-major: the picks are flat indices into the 12 samples.
  proxy = np.array([[0.1, 0.9, 0.5, -0.3],
                    [0.7, -0.2, 0.3, 0.0],
                    [-1.0, -0.5, -0.5, -2.0]], np.float32)
  picks = pipeline.best_of_n_picks(proxy)
  np.testing.assert_array_equal(picks, [1, 4, 9])       # ties (-0.5, -0.5) go to the first
  np.testing.assert_array_equal(proxy.reshape(-1)[picks], proxy.max(axis=1))


def test_best_of_one_picks_every_sample():
  np.testing.assert_array_equal(pipeline.best_of_n_picks(np.array([[3.], [-1.], [0.]])),
                                [0, 1, 2])


def test_stage_inputs_fingerprint_runs_and_datasets(tmp_path):
  """A stage trained on a dataset is stale once the dataset it names changes (a remade
  preference or revision dataset has another digest-named directory)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  run = tmp_path / "sft"
  (run / "checkpoints" / "10").mkdir(parents=True)
  old, new = (tmp_path / "preference" / name / "1.0.0" for name in ("ai-aaa", "ai-bbb"))
  for d in (old, new):
    d.mkdir(parents=True)
    (d / "metadata.json").write_text("{}")
  config = ml_collections.ConfigDict({"init": {"checkpoint": str(run)},
                                      "data": {"dataset_dir": str(old), "source": "dataset"}})
  before = pipeline.stage_inputs(config)
  assert before["init.checkpoint"]["step"] == 10
  assert before["data.dataset_dir"] == {"dataset": str(old)}
  config.data.dataset_dir = str(new)
  after = pipeline.stage_inputs(config)
  assert after != before
  assert pipeline._changed(before, after) == "data.dataset_dir: ai-aaa -> ai-bbb"  # pylint: disable=protected-access
