"""Gold reward of the sentiment testbed: VADER's compound score (Hutto & Gilbert, 2014).

As in DPO (Rafailov et al. 2023, 6.1), where a sentiment classifier plays the part of
the true human preference, the gold reward is known exactly, so a policy's reward and
its KL to the reference can both be measured. It is never trained on: it labels
preference pairs (through `annotators`) and judges policies.

What it rewards: VADER sums the valences of words in its lexicon ("great" +3.1, "awful"
-2.0), scaled up by intensifiers ("very", "extremely"), down by dampeners ("somewhat"),
reversed after negations ("not", "never", "isn't"), reweighted around "but" (the clause
after it counts 1.5x, the one before 0.5x), and amplified by exclamation marks (up to
four) and by ALL-CAPS lexicon words in otherwise mixed-case text. The compound score
normalises the sum `x` to `x / sqrt(x^2 + 15)`, in [-1, 1].

It is gameable, which is the point of a testbed for reward hacking: a bag of positive
words scores near 1 whatever the grammar ("great great GREAT!!!" beats any honest
review), length helps until the score saturates, and words outside the lexicon count
for nothing. An optimiser pushed far from the reference drifts towards such text;
`evaluation` reports distinct-n and samples so that drift is visible.

Importing this module registers `gold_reward` as the text reward "gold"
(`config.rl.reward`, `config.sampling.gold_reward`; `rlhf_jax.rl.rewards`).
"""

import functools
from typing import Sequence

import numpy as np
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_jax.rl import rewards


@functools.lru_cache(maxsize=1)
def analyzer():
  """The shared VADER analyser (read-only after construction)."""
  return SentimentIntensityAnalyzer()


def gold_reward(texts: Sequence[str]) -> np.ndarray:
  """VADER compound scores of `texts` -> `[batch]` float32 in [-1, 1]."""
  if isinstance(texts, (str, bytes)):
    raise ValueError("gold_reward: texts must be a sequence of strings, got a single "
                     f"{type(texts).__name__}")
  sia = analyzer()
  scores = np.empty(len(texts), np.float32)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"gold_reward: texts[{i}] is {type(text).__name__}, not str")
    scores[i] = sia.polarity_scores(text)["compound"]
  return scores


rewards.register_text_reward("gold", gold_reward)
