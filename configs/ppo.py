"""RLHF with PPO on the sentiment testbed (InstructGPT; Huang et al. 2024, "The N+
implementation details of RLHF with PPO").

  python -m experiments.train --config=configs/ppo.py --workdir=/tmp/ppo \
      --config.init.checkpoint=/tmp/sft --config.rl.reward_checkpoint=/tmp/rm

Sized for the testbed on 2 CPU cores: the "small" model (as pretrained by
configs/pretrain.py), 64 prompts x 1 sample per iteration, 48 new tokens.
`configs/rloo.py`, `configs/grpo.py` and `configs/online_dpo.py` change `rl.algorithm` and
its settings; sampling (response length, temperature, eval texts) is `config.sampling`.
"""

import ml_collections

from configs import base


def rl_config() -> ml_collections.ConfigDict:
  """`config.rl`: the RL stage's algorithm, reward and update settings."""
  p = ml_collections.ConfigDict()
  p.algorithm = "ppo"           # rlhf_jax/rl/algorithms.py: "ppo" (GAE, critic); "rloo", "grpo":
                                # k samples a prompt, no critic; "online_dpo": DPO on the best and
                                # worst of k samples a prompt
  p.reward = "model"            # rlhf_jax/rl/rewards.py: "model", the learned RM at
                                # reward_checkpoint; or a registered text reward ("gold": the
                                # testbed's VADER, registered by rlhf_jax.testbed)
  p.reward_checkpoint = ""      # reward-stage workdir; its config.json gives the RM's architecture
  # reward = "judge" (direct RLAIF, rlhf_jax/feedback/direct.py): the judge's yes/no log-odds
  # about each response is the reward, no reward model in between.
  p.judge = ""                  # the judge: an rlhf_jax run's workdir or a Hugging Face model dir
  p.judge_constitution = ""     # constitution file with templates.verdict, verdict_options and
                                # principles[i].verdict_question
  p.judge_principles = "all"    # "all" (log-odds averaged over the principles) or one's name
  p.judge_prompt_format = "auto"   # "plain", "chat" (the judge's chat template) or "auto"
  p.judge_batch_size = 16       # judge rows (response x principle) per forward pass
  p.critic = "separate"         # "separate": scalar-head model initialised from the RM
                                # (InstructGPT; from the policy's checkpoint when there is no RM);
                                # "shared": a value head on the policy's trunk
  p.samples_per_prompt = 1      # k responses per prompt (RLOO / GRPO need >= 2)
  p.epochs = 1                  # passes over each rollout (Huang et al. use 4: on 2 CPU cores the
                                # gradient step, not sampling, is the cost, so fresh rollouts win)
  p.num_minibatches = 2         # optimizer updates per epoch (rollout batch split, shuffled)
  p.clip_eps = 0.2              # PPO ratio clip epsilon
  p.value_clip_eps = 0.2        # value clipping around the rollout values
  p.vf_coef = 0.1               # value loss weight (shared optimizer)
  p.entropy_coef = 0.0          # entropy bonus weight
  p.gamma = 1.0                 # discount
  p.lam = 0.95                  # GAE lambda
  p.kl_coef = 0.05              # beta: KL penalty coefficient (initial value when adaptive);
                                # online_dpo: DPO's beta, the KL weight of the objective it solves
  p.dpo_loss = "sigmoid"        # online_dpo's loss: sigmoid (DPO), ipo, hinge, robust
  p.kl_estimator = "k1"         # per-token KL in the reward: "k1" log(pi/pi_ref), "k3" r-1-log r
  p.adaptive_kl = False         # Ziegler et al. 2019 adaptive controller towards kl_target
  p.kl_target = 6.0             # target sequence KL (nats) for the adaptive controller
  p.kl_horizon = 10000          # controller horizon (in responses)
  p.missing_eos_penalty = 0.0   # subtracted from the score of responses without EOS (0: off)
  p.whiten_rewards = False      # scale per-token rewards to unit std (mean kept)
  p.whiten_advantages = True    # normalise advantages over the rollout (PPO, RLOO)
  return p


def get_config():
  c = base.get_config()
  c.stage = "ppo"
  c.model = base.model_config("small")  # must match the SFT checkpoint (config.init.checkpoint)
  c.data.prompt_len = 24        # left-padded prompt tokens (testbed prompts are 2-8 words)
  c.data.batch_size = 64        # prompts per iteration
  c.data.eval_batch_size = 64
  c.train.num_steps = 40        # iterations (rollout + epochs of updates): ~8 min on 2 shared cores
  c.train.log_every = 2
  c.train.eval_every = 0        # the final evaluation only
  c.train.eval_batches = 4      # 256 held-out prompts
  c.train.checkpoint_every = 20
  c.optimizer.learning_rate = 1e-4   # 2e-4 drifts to short responses (KL 6 by iteration 8)
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0  # counted in optimizer updates (iterations x epochs x minibatches)
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-5        # Huang et al. 2024: Adam epsilon 1e-5
  c.rl = rl_config()
  c.sampling.max_new_tokens = 48   # response length limit (prompt_len + this <= model.max_len)
  c.sampling.temperature = 1.0     # rollout temperature; training log-probs use logits / temperature
  c.sampling.eval_texts = 4        # sampled texts kept in the eval metrics under 'samples'
  return c
