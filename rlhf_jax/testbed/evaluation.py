"""Pure metrics for evaluating a policy on the sentiment testbed.

The DPO paper's sentiment frontier (Rafailov et al. 2023, fig. 2 left) plots mean gold
reward against the sequence-level KL(pi || pi_ref). The policy metrics themselves (KL
estimate, distinct-n, summary) live in the core, `rlhf_jax.rl.evaluation`, and are
re-exported here; best-of-n's analytic KL is the testbed's own.
"""

import math

import numpy as np

from rlhf_jax.rl.evaluation import distinct_n  # noqa: F401
from rlhf_jax.rl.evaluation import sequence_kl_estimate  # noqa: F401
from rlhf_jax.rl.evaluation import summarize_policy  # noqa: F401


def best_of_n_kl(n: int) -> float:
  """KL(best-of-n || base) = log n - (n - 1) / n.

  The analytic value used by Stiennon et al. 2020 (appendix G.3) and Gao et al. 2022
  (sec. 2); it is exact when ties have probability zero and otherwise an upper bound
  (Beirami et al. 2024).
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"evaluation.best_of_n_kl: n must be an int >= 1, got {n!r}")
  return math.log(n) - (n - 1) / n
