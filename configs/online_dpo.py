"""Online (iterative) DPO: DPO on pairs the current policy samples, labelled each round.

A variant of the ppo stage (`config.rl.algorithm = "online_dpo"`, Guo et al. 2024):
every iteration is one round: 2 samples for each of `data.batch_size` prompts, the
reward (`rl.reward`: the learned model at `rl.reward_checkpoint`, or a text
reward such as the testbed's gold) picks chosen and rejected, then `epochs` x `num_minibatches`
DPO updates against the frozen SFT reference, beta = `rl.kl_coef`.

  python -m experiments.train --config=configs/online_dpo.py --workdir=/tmp/odpo \
      --config.init.checkpoint=/tmp/sft --config.rl.reward=gold --config.train.num_steps=50
"""

from configs import ppo


def get_config():
  c = ppo.get_config()
  c.rl.algorithm = "online_dpo"
  c.rl.samples_per_prompt = 2  # the best and the worst of k form the round's pair
  c.rl.kl_coef = 0.1           # DPO's beta
  c.rl.dpo_loss = "sigmoid"
  c.rl.num_minibatches = 4     # 64 pairs a round -> 4 updates of 16 pairs (offline DPO's batch)
  c.rl.whiten_advantages = False
  c.train.num_steps = 50        # rounds: 50 x 64 = 3,200 pairs, offline DPO's 200 steps of 16
  return c
