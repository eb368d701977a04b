"""Online (iterative) DPO: DPO on pairs the current policy samples, labelled each round.

A variant of the ppo stage (`config.ppo.algorithm = "online_dpo"`, Guo et al. 2024):
every iteration is one round: 2 samples for each of `data.batch_size` prompts, the
reward function (`ppo.reward`: the learned model at `ppo.reward_checkpoint`, or the
testbed's gold reward) picks chosen and rejected, then `epochs` x `num_minibatches`
DPO updates against the frozen SFT reference, beta = `ppo.kl_coef`.

  python -m experiments.train --config=configs/online_dpo.py --workdir=/tmp/odpo \
      --config.init.checkpoint=/tmp/sft --config.ppo.reward=gold --config.train.num_steps=50
"""

from configs import ppo


def get_config():
  c = ppo.get_config()
  c.ppo.algorithm = "online_dpo"
  c.ppo.samples_per_prompt = 2  # the best and the worst of k form the round's pair
  c.ppo.kl_coef = 0.1           # DPO's beta
  c.ppo.dpo_loss = "sigmoid"
  c.ppo.num_minibatches = 4     # 64 pairs a round -> 4 updates of 16 pairs (offline DPO's batch)
  c.ppo.whiten_advantages = False
  c.train.num_steps = 50        # rounds: 50 x 64 = 3,200 pairs, offline DPO's 200 steps of 16
  return c
