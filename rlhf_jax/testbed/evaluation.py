"""Pure metrics for evaluating a policy on the sentiment testbed.

The DPO paper's sentiment frontier (Rafailov et al. 2023, fig. 2 left) plots mean gold
reward against the sequence-level KL(pi || pi_ref); these helpers compute both with
standard errors, plus diversity (distinct-n) to expose reward hacking.
"""

import math
from typing import Optional, Sequence

import numpy as np


def sequence_kl_estimate(policy_logprobs, ref_logprobs, mask) -> tuple[float, float]:
  """Monte-Carlo estimate of the sequence-level KL(pi || pi_ref) from samples of pi.

  KL = E_{y ~ pi}[log pi(y) - log pi_ref(y)], with log pi(y) the sum over response
  tokens. Each sequence gives an unbiased (possibly negative) estimate; we return their
  mean and its standard error std / sqrt(B) (ddof=1; NaN when B == 1). The log-probs
  must be of the distribution that was sampled (temperature 1 for the policy's KL).

  Args:
    policy_logprobs: `[B, N]` log pi of the sampled tokens.
    ref_logprobs: `[B, N]` log pi_ref of the same tokens.
    mask: `[B, N]` 1 on response tokens, 0 on padding.

  Returns:
    (mean, standard_error) as Python floats.
  """
  logp = np.asarray(policy_logprobs, np.float64)
  ref = np.asarray(ref_logprobs, np.float64)
  m = np.asarray(mask, np.float64)
  if logp.ndim != 2 or logp.shape != ref.shape or logp.shape != m.shape:
    raise ValueError("evaluation.sequence_kl_estimate: policy_logprobs, ref_logprobs and "
                     f"mask must share one [B, N] shape, got {logp.shape}, {ref.shape}, "
                     f"{m.shape}")
  if logp.shape[0] == 0:
    raise ValueError("evaluation.sequence_kl_estimate: empty batch")
  # Zero padding before subtracting: -inf log-probs there must not make NaN.
  real = m > 0
  per_seq = ((np.where(real, logp, 0.0) - np.where(real, ref, 0.0)) * m).sum(axis=1)
  b = per_seq.shape[0]
  se = float(per_seq.std(ddof=1) / math.sqrt(b)) if b > 1 else float("nan")
  return float(per_seq.mean()), se


def distinct_n(texts: Sequence[str], n: int) -> float:
  """Unique n-grams of words over all texts / total n-grams (0 if there are none).

  Words are whitespace-separated; n-grams do not cross text boundaries.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"evaluation.distinct_n: n must be an int >= 1, got {n!r}")
  unique, total = set(), 0
  for text in texts:
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    unique.update(grams)
    total += len(grams)
  return len(unique) / total if total else 0.0


def best_of_n_kl(n: int) -> float:
  """KL(best-of-n || base) = log n - (n - 1) / n.

  The analytic value used by Stiennon et al. 2020 (appendix G.3) and Gao et al. 2022
  (sec. 2); it is exact when ties have probability zero and otherwise an upper bound
  (Beirami et al. 2024).
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"evaluation.best_of_n_kl: n must be an int >= 1, got {n!r}")
  return math.log(n) - (n - 1) / n


def _json_float(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


def summarize_policy(texts: Sequence[str], gold_scores, lengths,
                     kl: Optional[tuple[float, float]] = None,
                     num_samples: int = 4) -> dict:
  """JSON-serialisable summary of one policy's samples.

  Args:
    texts: `[B]` sampled responses (or prompt + response).
    gold_scores: `[B]` gold rewards of `texts`.
    lengths: `[B]` response lengths in tokens.
    kl: optional (mean, standard_error) from `sequence_kl_estimate`.
    num_samples: how many (text, gold) examples to keep, the first ones.

  Returns:
    {'num', 'gold_mean', 'gold_std', 'gold_stderr', 'length_mean', 'distinct_1',
    'distinct_2', 'kl', 'kl_stderr', 'samples': [{'text', 'gold'}]}; std and
    stderr use ddof=1; non-finite values (a stderr from B == 1, no KL) are None.
  """
  gold = np.asarray(gold_scores, np.float64)
  lens = np.asarray(lengths, np.float64)
  b = len(texts)
  if b == 0:
    raise ValueError("evaluation.summarize_policy: no texts")
  if gold.shape != (b,) or lens.shape != (b,):
    raise ValueError(f"evaluation.summarize_policy: gold_scores {gold.shape} and lengths "
                     f"{lens.shape} must both be [{b}] like texts")
  std = gold.std(ddof=1) if b > 1 else float("nan")
  kl_mean, kl_se = kl if kl is not None else (float("nan"), float("nan"))
  return {
      "num": b,
      "gold_mean": _json_float(gold.mean()),
      "gold_std": _json_float(std),
      "gold_stderr": _json_float(std / math.sqrt(b)),
      "length_mean": _json_float(lens.mean()),
      "distinct_1": distinct_n(texts, 1),
      "distinct_2": distinct_n(texts, 2),
      "kl": _json_float(kl_mean),
      "kl_stderr": _json_float(kl_se),
      "samples": [{"text": str(t), "gold": _json_float(g)}
                  for t, g in zip(texts[:num_samples], gold[:num_samples])],
  }
