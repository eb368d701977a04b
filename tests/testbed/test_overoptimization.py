"""The best-of-n estimator against enumeration, and the functional-form fits."""

import itertools

import numpy as np

from rlhf_jax.testbed import overoptimization as overopt


def test_best_of_n_expectation_equals_enumerating_every_subset():
  rng = np.random.default_rng(0)
  proxy, gold = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
  for n in (1, 2, 3, 7):
    expected = [np.mean([gold[p, max(s, key=lambda i: proxy[p, i])]
                         for s in itertools.combinations(range(7), n)]) for p in range(3)]
    np.testing.assert_allclose(overopt.best_of_n_expectation(proxy, gold, n), expected, atol=1e-12)
  np.testing.assert_allclose(overopt.best_of_n_expectation(proxy, gold, 1), gold.mean(1))


def test_fit_recovers_the_coefficients_of_each_form():
  d = np.linspace(0.1, 4.0, 30)
  for form in ("bon", "rl"):
    truth = overopt.fitted(form, 0.7, 0.2)(d)
    alpha, beta = overopt.fit(form, d, truth)
    np.testing.assert_allclose([alpha, beta], [0.7, 0.2], atol=1e-9)
