"""RLAIF and Constitutional AI on the red-team testbed (`rlhf_jax/testbed/harsh_reviews.py`).

  python -m experiments.ai_feedback --workdir=runs/ai_feedback [--config.quick=True]

One pretrained model (reviews written on harsh requests, plus the constitution's
comparisons, verdicts and critique-revisions in its corpus) is the base of every policy
and of the feedback model (fine-tuned on the corpus's judgements, critiques and
revisions alone), which judges pairs and critiques and revises the SFT policy's samples. Stages, each beside its twin trained on simulated human
labels of the gold helpfulness:

  RLHF (helpful only)  sft -> labels_human -> reward_human -> ppo_human, dpo_human
  RLAIF                sft -> labels_ai (judge, principle 'helpful') -> reward_ai -> ppo_ai, dpo_ai
  SL-CAI               sft critiques and revises its own samples ('harmless') -> sft_cai
  RL-CAI               sft_cai -> labels_cai (judge, all principles) -> reward_cai -> ppo_cai, dpo_cai

Stage configs are the stages' own `configs/<stage>.py`, adjusted here; the model,
tokenizer and corpus fields are shared and copied into each stage.
"""

import os

import ml_collections

from configs import pipeline as pipeline_config
from configs import pretrain


def get_config():
  c = pipeline_config.get_config()
  c.model = pretrain.get_config().model
  c.model.max_len = 256           # a comparison of two reviews is up to 230 bytes
  c.data = ml_collections.ConfigDict()    # copied into every stage's config.data
  c.data.constitution = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                     "constitutions", "harsh_reviews.json")
  c.data.corpus_seed = 0
  c.data.corpus_train = 40_000
  c.data.corpus_test = 1_000

  c.pretrain.data.source = "harsh_reviews"
  c.pretrain.data.seq_len = 256
  c.pretrain.train.update(num_steps=500, eval_every=0, checkpoint_every=250)

  # The feedback model (judge, critic, reviser): the pretrained model fine-tuned on the
  # corpus's comparisons, verdicts and critique-revisions alone (the loss on the judgement,
  # critique and revision), as RLAIF and CAI feedback models are instruction-tuned.
  c.feedback_model = ml_collections.ConfigDict(c.sft.to_dict())
  c.feedback_model.data.source = "harsh_reviews_feedback"
  c.feedback_model.data.seq_len = 256
  c.feedback_model.data.batch_size = 32
  c.feedback_model.optimizer.learning_rate = 1e-3
  c.feedback_model.train.update(num_steps=600, eval_every=0, checkpoint_every=300)

  c.sft.data.source = "harsh_reviews"
  c.sft.data.seq_len = 96
  c.sft.train.update(num_steps=100, eval_every=0, checkpoint_every=100)

  for stage in (c.ppo, c.dpo):
    stage.data.prompt_len = 24
    stage.sampling.max_new_tokens = 72
    stage.sampling.gold_reward = "harshness"
  c.ppo.data.source = "harsh_reviews"
  c.ppo.train.update(num_steps=30, eval_every=0, checkpoint_every=10, keep_checkpoints=0)
  c.ppo.sampling.eval_prompts = 64
  c.reward.data.seq_len = 96
  c.dpo.data.seq_len = 96
  c.dpo.train.update(num_steps=100, checkpoint_every=100)
  c.reward.train.update(num_steps=200, checkpoint_every=200)

  c.labels.update(num_prompts=500, num_test_prompts=100)

  c.feedback = ml_collections.ConfigDict()
  c.feedback.judge_batch_size = 64
  c.feedback.rlaif_principles = "helpful"   # RLAIF: the same task the human labels judge
  c.feedback.cai_principles = "all"         # RL-CAI: every principle's probability averaged
  c.feedback.revision_principles = "harmless"   # SL-CAI (Bai et al. revise for harmlessness)
  c.feedback.revision_prompts = 1000        # SL-CAI training prompts (train split)
  c.feedback.revision_rounds = 1
  c.feedback.critique_tokens = 40    # request + response (72) + critique + revision fit in 256
  c.feedback.revision_tokens = 64

  c.sft_cai = ml_collections.ConfigDict(c.sft.to_dict())
  c.sft_cai.data.source = "dataset"

  c.evaluation.num_prompts = 256
  c.evaluation.frontier_prompts = 128       # per PPO checkpoint, for the frontier plot
  return c


def make_quick(c: ml_collections.ConfigDict) -> None:
  """CI size: the same stages and code paths in a few minutes."""
  pipeline_config.make_quick(c)
  c.model.max_len = 256
  c.data.update(corpus_train=2000, corpus_test=200)
  c.pretrain.train.update(num_steps=120, eval_every=0, checkpoint_every=120)
  c.pretrain.optimizer.warmup_steps = 10
  c.sft.train.update(num_steps=20, checkpoint_every=20)
  c.feedback_model.train.update(num_steps=20, checkpoint_every=20, eval_batches=2)
  c.sft_cai.train.update(num_steps=10, checkpoint_every=10, eval_every=0, eval_batches=2)
  c.ppo.train.update(num_steps=2, eval_every=0, checkpoint_every=1, keep_checkpoints=0)
  c.ppo.sampling.update(max_new_tokens=24, eval_prompts=16)
  c.dpo.sampling.update(max_new_tokens=24, eval_prompts=16)
  c.dpo.train.update(num_steps=10, checkpoint_every=10)
  c.reward.train.update(num_steps=10, checkpoint_every=10)
  c.labels.update(num_prompts=24, num_test_prompts=16)
  c.feedback.update(revision_prompts=32, revision_tokens=24, critique_tokens=24,
                    judge_batch_size=16)
  c.evaluation.update(num_prompts=16, frontier_prompts=16)
