"""The whole pipeline on the sentiment testbed, one stage config per field.

  python -m experiments.pipeline --workdir=runs/pipeline [--config.quick=True]
  python -m experiments.pipeline --workdir=runs/p --config.ppo.train.num_steps=200

Every stage config is the stage's own `configs/<stage>.py`, adjusted here; the
model, tokenizer and corpus fields are shared and copied into each stage.
"""

import ml_collections

from configs import dpo
from configs import ppo
from configs import pretrain
from configs import reward
from configs import sft


def get_config():
  c = ml_collections.ConfigDict()
  c.quick = False               # CI-sized run (about 3 minutes): fewer steps, prompts and samples
  c.seed = 0                    # every stage's seed
  c.model = pretrain.get_config().model   # one model for every stage: the pretrained one
  c.data = ml_collections.ConfigDict()
  c.data.corpus_seed = 0
  c.data.corpus_train = 100_000
  c.data.corpus_test = 5_000

  c.pretrain = pretrain.get_config()
  c.pretrain.train.update(num_steps=300, eval_every=150, checkpoint_every=150)

  c.sft = sft.get_config()
  c.sft.train.update(num_steps=150, eval_every=0, checkpoint_every=150)
  c.sft.optimizer.learning_rate = 3e-4

  c.labels = ml_collections.ConfigDict()  # simulated annotators (experiments.label_preferences)
  c.labels.k = 4                # responses per prompt
  c.labels.temperature = 0.5    # annotator noise: P(a > b) = sigmoid((gold_a - gold_b) / T)
  c.labels.flip_rate = 0.0
  c.labels.num_prompts = 1000   # train prompts (testbed 'train' prefixes)
  c.labels.num_test_prompts = 200

  c.reward = reward.get_config()
  c.reward.data.source = "dataset"
  c.reward.data.train_file = ""
  c.reward.data.seq_len = 96
  c.reward.reward_model.pooling = "sum"   # the last-token reading does not learn the testbed's
                                          # sentiment at this size (held-out accuracy stays at 0.5)
  c.reward.data.batch_size = 32
  c.reward.train.update(num_steps=300, eval_every=0, checkpoint_every=300)
  c.reward.optimizer.learning_rate = 3e-4   # 1e-3 does not learn; 1e-4 learns slower

  c.ppo = ppo.get_config()
  c.ppo.rl.reward = "model"
  c.ppo.rl.update(epochs=1, num_minibatches=2)
  c.ppo.train.update(num_steps=40, eval_every=0, checkpoint_every=20)
  c.ppo.optimizer.learning_rate = 1e-4

  c.dpo = dpo.get_config()
  c.dpo.data.source = "dataset"
  c.dpo.data.train_file = ""
  c.dpo.data.seq_len = 96
  c.dpo.train.update(num_steps=200, eval_every=0, checkpoint_every=200)

  c.evaluation = ml_collections.ConfigDict()
  c.evaluation.num_prompts = 256  # held-out prompts per policy
  c.evaluation.best_of_n = 16     # best-of-n against the learned reward model
  c.evaluation.num_samples = 2    # sample texts shown per policy
  c.evaluation.reward_samples = 1024  # fresh SFT samples for the reward model's correlation with gold
  return c


def make_quick(c: ml_collections.ConfigDict) -> None:
  """Shrinks every stage for CI: same code paths, a few minutes in all."""
  c.model.update(embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                 mlp_dim=192)
  c.data.update(corpus_train=3000, corpus_test=300)
  c.pretrain.train.update(num_steps=60, eval_every=0, checkpoint_every=60, eval_batches=2)
  c.sft.train.update(num_steps=30, eval_every=0, checkpoint_every=30, eval_batches=2)
  c.labels.update(num_prompts=64, num_test_prompts=32)
  c.reward.train.update(num_steps=30, eval_every=0, checkpoint_every=30)
  c.ppo.train.update(num_steps=4, eval_every=0, checkpoint_every=4, eval_batches=1)
  c.ppo.data.update(batch_size=16, eval_batch_size=16)
  c.ppo.rl.update(epochs=1, num_minibatches=2)
  c.ppo.sampling.max_new_tokens = 16
  c.dpo.train.update(num_steps=30, eval_every=0, checkpoint_every=30)
  c.dpo.sampling.update(eval_prompts=32, max_new_tokens=16)
  c.evaluation.update(num_prompts=32, best_of_n=4, reward_samples=64)
