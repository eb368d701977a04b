"""Sentiment testbed (DPO, Rafailov et al. 2023, sec. 6.1).

corpus: review grammar; gold_reward: VADER; annotators: noisy preference labels;
evaluation: reward, KL and diversity metrics.

Importing this package registers what the testbed provides: the data source `testbed`
(`config.data.source`) and the gold reward `gold` (`config.rl.reward`,
`config.sampling.gold_reward`). The core never imports it; entry points and tests do.
"""

from rlhf_jax.testbed import data as _data  # registers data source 'testbed'
from rlhf_jax.testbed import gold_reward as _gold_reward  # registers reward 'gold'
