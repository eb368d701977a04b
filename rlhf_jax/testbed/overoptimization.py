"""Reward-model over-optimisation (Gao et al. 2022): the best-of-n estimator and the fits."""

import math

import numpy as np


def best_of_n_expectation(proxy: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
  """E[value of the proxy-best of n draws without replacement from a pool], per prompt.

  proxy, values: [prompts, pool]. With the pool sorted by proxy, the i-th smallest
  (0-based) is the best of a uniformly random n-subset with probability
  C(i, n-1) / C(pool, n) (Gao et al. 2022, appendix I).
  """
  pool = proxy.shape[1]
  order = np.argsort(proxy, axis=1, kind="stable")
  sorted_values = np.take_along_axis(values, order, axis=1)
  log_c = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)
  weights = np.array([math.exp(log_c(i, n - 1) - log_c(pool, n)) if i >= n - 1 else 0.0
                      for i in range(pool)])
  return sorted_values @ weights


def fit(form: str, d: np.ndarray, gain: np.ndarray) -> tuple[float, float]:
  """Least-squares (alpha, beta) of gain = d (alpha - beta d) ['bon'] or d (alpha - beta log d) ['rl']."""
  second = d ** 2 if form == "bon" else d * np.log(np.maximum(d, 1e-12))
  (alpha, minus_beta), *_ = np.linalg.lstsq(np.stack([d, -second], 1), gain, rcond=None)
  return float(alpha), float(minus_beta)


def fitted(form: str, alpha: float, beta: float):
  if form == "bon":
    return lambda d: d * (alpha - beta * d)
  return lambda d: d * (alpha - beta * np.log(np.maximum(d, 1e-12)))
