"""Numerical helpers the tests share."""

import numpy as np


def fd_grad(f, x, eps=1e-6):
  """Central finite differences of scalar `f` at float64 array `x` (any shape)."""
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[i] = eps
    g[i] = (float(f(x + d)) - float(f(x - d))) / (2 * eps)
  return g
