"""rlhf_jax: a JAX-native post-training pipeline (SFT, reward modelling, PPO, DPO)."""
