"""SFT on the testbed's review continuations (prompt: a review's first words)."""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "sft"
  # The pretrained testbed model (configs/pretrain.py), so --config.init.checkpoint loads it.
  c.model = base.model_config("small")
  c.model.update(embed_dim=128, head_dim=32, mlp_dim=384)
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.train.num_steps = 300
  c.train.eval_every = 100
  c.optimizer.learning_rate = 1e-3
  return c
