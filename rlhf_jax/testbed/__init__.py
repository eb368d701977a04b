"""Sentiment testbed (DPO, Rafailov et al. 2023, sec. 6.1).

corpus: review grammar; gold_reward: VADER; annotators: noisy preference labels;
evaluation: reward, KL and diversity metrics.
"""
