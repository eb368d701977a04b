"""Simulated annotators: noisy pairwise preference labels from gold scores.

A simulated person shown responses `a` and `b` to one prompt prefers `a` with
probability `sigmoid((gold(a) - gold(b)) / temperature)`: the Bradley-Terry model
(Bradley & Terry 1952; DPO, Rafailov et al. 2023, eq. 1) with reward
`gold / temperature`. Temperature 0 labels by the sign of the gold difference. A label
is then flipped with probability `flip_rate` (inattentive annotators). Pairs whose gold
scores tie within `tie_eps` are not labelled but counted.
"""

import itertools
from typing import Sequence, Union

import numpy as np

PairsPerPrompt = Union[str, int]


def _pair_indices(k: int, pairs_per_prompt: PairsPerPrompt, rng: np.random.Generator):
  """Index pairs (i, j), i < j, of the k responses to one prompt."""
  if pairs_per_prompt == "all":
    return list(itertools.combinations(range(k), 2))
  if pairs_per_prompt == "adjacent":  # (0, 1), (1, 2), ...: k - 1 pairs
    return [(i, i + 1) for i in range(k - 1)]
  all_pairs = list(itertools.combinations(range(k), 2))
  chosen = np.sort(rng.choice(len(all_pairs), size=pairs_per_prompt, replace=False))
  return [all_pairs[c] for c in chosen]


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return np.exp(-np.logaddexp(0.0, -x))


def label_pairs(prompts: Sequence[str], responses: Sequence[Sequence[str]],
                scores: np.ndarray, *, rng_seed: int, temperature: float,
                flip_rate: float = 0.0, pairs_per_prompt: PairsPerPrompt = "all",
                tie_eps: float = 0.0):
  """Labels pairs of responses as noisy annotators would.

  Args:
    prompts: `[num_prompts]` prompt strings.
    responses: `[num_prompts][k]` response strings (without the prompt), k >= 2.
    scores: `[num_prompts, k]` gold scores of the responses.
    rng_seed: seeds a `np.random.Generator`; the records are a function of the inputs
      and this seed.
    temperature: >= 0; P(a > b) = sigmoid((s_a - s_b) / temperature), 0 is exact.
    flip_rate: in [0, 0.5], probability that a label is flipped after it is drawn.
    pairs_per_prompt: 'all' (k(k-1)/2 pairs), 'adjacent' ((i, i+1): k-1 pairs), or an
      int m in [1, k(k-1)/2]: m distinct pairs drawn uniformly per prompt.
    tie_eps: pairs with |s_a - s_b| <= tie_eps are ties: counted, not labelled.

  Returns:
    (records, stats). records: list of dicts {'prompt', 'chosen', 'rejected',
    'chosen_score', 'rejected_score', 'margin': 0.0}, in prompt order, then pair
    order. stats: {'pairs', 'labelled', 'ties', 'flipped', 'agree_with_gold',
    'agreement_rate'} where agreement means the chosen response has the higher gold
    score (agreement_rate = agree_with_gold / labelled, 0 when nothing is labelled).
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f"annotators.label_pairs: scores must be [num_prompts, k], got "
                     f"shape {scores.shape}")
  num_prompts, k = scores.shape
  if k < 2:
    raise ValueError(f"annotators.label_pairs: need k >= 2 responses per prompt, got k={k}")
  if len(prompts) != num_prompts or len(responses) != num_prompts:
    raise ValueError(f"annotators.label_pairs: len(prompts)={len(prompts)}, "
                     f"len(responses)={len(responses)} and scores.shape[0]={num_prompts} "
                     "must be equal")
  for i, r in enumerate(responses):
    if isinstance(r, str) or len(r) != k:
      raise ValueError(f"annotators.label_pairs: responses[{i}] must be a list of k={k} "
                       f"strings (scores.shape[1]), got {r!r:.80}")
  if not np.all(np.isfinite(scores)):
    bad = tuple(int(x) for x in np.argwhere(~np.isfinite(scores))[0])
    raise ValueError(f"annotators.label_pairs: scores{list(bad)} is not finite")
  if not temperature >= 0:
    raise ValueError(f"annotators.label_pairs: temperature must be >= 0, got {temperature}")
  if not 0.0 <= flip_rate <= 0.5:
    raise ValueError(f"annotators.label_pairs: flip_rate must be in [0, 0.5], got "
                     f"{flip_rate}")
  if not tie_eps >= 0:
    raise ValueError(f"annotators.label_pairs: tie_eps must be >= 0, got {tie_eps}")
  max_pairs = k * (k - 1) // 2
  if isinstance(pairs_per_prompt, str):
    if pairs_per_prompt not in ("all", "adjacent"):
      raise ValueError("annotators.label_pairs: pairs_per_prompt must be 'all', "
                       f"'adjacent' or an int, got {pairs_per_prompt!r}")
  elif (isinstance(pairs_per_prompt, bool) or not isinstance(pairs_per_prompt, (int, np.integer))
        or not 1 <= pairs_per_prompt <= max_pairs):
    raise ValueError(f"annotators.label_pairs: pairs_per_prompt={pairs_per_prompt!r} must "
                     f"be an int in [1, k(k-1)/2={max_pairs}]")

  rng = np.random.default_rng(rng_seed)
  records = []
  stats = dict(pairs=0, labelled=0, ties=0, flipped=0, agree_with_gold=0)
  for p in range(num_prompts):
    pairs = _pair_indices(k, pairs_per_prompt, rng)
    # Draws for every pair, ties included, so labels do not depend on tie_eps.
    u_pref, u_flip = rng.random(len(pairs)), rng.random(len(pairs))
    for (i, j), up, uf in zip(pairs, u_pref, u_flip):
      stats["pairs"] += 1
      diff = scores[p, i] - scores[p, j]
      if abs(diff) <= tie_eps:
        stats["ties"] += 1
        continue
      if temperature == 0:
        i_wins = diff > 0
      else:
        i_wins = up < _sigmoid(diff / temperature)
      if uf < flip_rate:
        i_wins = not i_wins
        stats["flipped"] += 1
      c, r = (i, j) if i_wins else (j, i)
      stats["labelled"] += 1
      stats["agree_with_gold"] += int(scores[p, c] > scores[p, r])
      records.append({
          "prompt": prompts[p],
          "chosen": responses[p][c],
          "rejected": responses[p][r],
          "chosen_score": float(scores[p, c]),
          "rejected_score": float(scores[p, r]),
          "margin": 0.0,
      })
  stats["agreement_rate"] = (stats["agree_with_gold"] / stats["labelled"]
                             if stats["labelled"] else 0.0)
  return records, stats
