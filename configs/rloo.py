"""RLOO (Ahmadian et al. 2024): k samples per prompt, leave-one-out baseline, no critic.

A variant of the ppo stage: `config.stage` stays "ppo", `config.rl.algorithm` is "rloo".
The sequence reward is the score minus beta times the sequence KL to the reference.
"""

from configs import ppo


def get_config():
  c = ppo.get_config()
  c.rl.algorithm = "rloo"
  c.rl.samples_per_prompt = 4  # k: the baseline of a sample is the mean of the other k - 1
  c.data.batch_size = 16        # prompts per iteration: 16 x 4 = 64 responses
  c.rl.whiten_advantages = False
  return c
