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
