"""Pretraining the testbed model on the review corpus (next-token on every byte)."""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "pretrain"
  c.model = base.model_config("small")
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.train.num_steps = 1000
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 50
  return c
