"""Pure RLHF losses over log-probs, rewards and masks (never models), float32.

  sft             token / sequence log-probs, entropy, SFT loss
  bradley_terry   reward-model pairwise loss
  preference      DPO family (cDPO, robust DPO, IPO, hinge, SimPO, ORPO) and KTO
  policy_gradient KL-shaped rewards, GAE, PPO, RLOO, GRPO
"""

from rlhf_jax.objectives import bradley_terry
from rlhf_jax.objectives import policy_gradient
from rlhf_jax.objectives import preference
from rlhf_jax.objectives import sft
