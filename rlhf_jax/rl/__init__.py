"""Reinforcement learning from a reward: the pieces the RL stage (`stages/ppo.py`) plugs together.

algorithms: `config.rl.algorithm` -> advantage estimator, policy loss, critic, sample rules.
rewards: `config.rl.reward` -> the learned reward model or a registered text reward.
models: the stage's modules and the config checks made before anything is built.
rollout: sampling and scoring one batch of responses.
evaluation: sampled policy metrics (KL to the reference, gold reward), used by DPO too.
"""
