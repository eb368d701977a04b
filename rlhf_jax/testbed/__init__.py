"""Sentiment testbed (DPO, Rafailov et al. 2023, sec. 6.1) and its red-team variant.

corpus: review grammar; gold_reward: VADER; annotators: noisy preference labels;
evaluation: reward, KL and diversity metrics; harsh_reviews: reviews on harsh requests,
insults (gold harm) and the constitution's principles in the corpus (AI feedback).

Importing this package registers what the testbed provides: the data sources `testbed`
and `harsh_reviews` (`config.data.source`) and the gold rewards `gold`, `harshness` and
`harm` (`config.rl.reward`, `config.sampling.gold_reward`). The core never imports it;
entry points and tests do.
"""

from rlhf_jax.testbed import data as _data  # registers data source 'testbed'
from rlhf_jax.testbed import gold_reward as _gold_reward  # registers reward 'gold'
from rlhf_jax.testbed import harsh_reviews as _harsh_reviews  # 'harsh_reviews', 'harshness', 'harm'
