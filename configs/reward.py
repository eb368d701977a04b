"""Reward model: Bradley-Terry on preference pairs (default: the real HH-RLHF sample)."""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "reward"
  c.data.source = "hh"
  c.data.train_file = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
  c.data.on_error = "skip"          # HH has a few malformed pairs; they are counted
  c.data.seq_len = 256
  c.data.batch_size = 16
  c.train.num_steps = 300
  c.train.eval_every = 100
  c.train.eval_batches = 0          # 0: the whole held-out split
  c.optimizer.learning_rate = 3e-4
  c.reward_model = ml_collections.ConfigDict()
  c.reward_model.pooling = "last"         # "last": scalar at the last real token (InstructGPT); "sum": summed over tokens
  c.reward_model.zero_head = True         # scalar head starts at 0: every reward starts at 0
  c.reward_model.use_margin = False       # subtract each pair's `margin` inside the sigmoid (Llama 2)
  c.reward_model.label_smoothing = 0.0    # eps: -(1-eps) log s(d) - eps log s(-d)
  c.reward_model.center_coef = 0.0        # lambda * (r_c + r_r)^2 keeps rewards centred at 0
  c.reward_model.soft_targets = False     # RLAIF soft labels: target P(chosen > rejected) =
                                          # sigmoid(margin), the AI judge's log-odds
  c.reward_model.clear_gold_gap = 0.1     # testbed: pairs whose gold scores differ by more than this
  return c
