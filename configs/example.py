"""The example stage (rlhf_jax/stages/example.py): linear regression through the real loop.

  python -m experiments.train --config=configs/example.py --workdir=/tmp/example
"""

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "example"
  c.data.batch_size = 8
  c.train.update(num_steps=12, log_every=2, eval_every=0, checkpoint_every=4)
  c.optimizer.warmup_steps = 2
  c.nan_at = 0        # fault injection for the loop's tests: batch nan_at carries a NaN (0: never)
  return c
