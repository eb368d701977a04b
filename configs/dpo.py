"""DPO and its family on preference pairs; the loss and beta are config values.

  python -m experiments.train --config=configs/dpo.py --workdir=/tmp/dpo \
      --config.init.checkpoint=/tmp/sft --config.preference.loss=ipo --config.preference.beta=0.5
"""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.stage = "dpo"
  c.data.source = "hh"
  c.data.train_file = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
  c.data.on_error = "skip"
  c.data.seq_len = 256
  c.data.batch_size = 16
  c.train.num_steps = 200
  c.train.eval_every = 100
  c.train.eval_batches = 0           # 0: the whole held-out split
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 10
  c.preference = ml_collections.ConfigDict()
  c.preference.loss = "sigmoid"             # a name in objectives.preference.LOSSES: sigmoid (DPO),
                                            # robust, ipo, ipo_length_normalised, hinge, simpo, orpo, kto
  c.preference.beta = 0.1                   # inverse temperature of the implicit reward (IPO: tau; SimPO: beta)
  c.preference.label_smoothing = 0.0        # cDPO / robust DPO: assumed label-flip rate
  c.preference.gamma = 0.5                  # SimPO target reward margin
  c.preference.lam = 0.1                    # ORPO weight of the odds-ratio term
  c.preference.desirable_weight = 1.0       # KTO lambda_D
  c.preference.undesirable_weight = 1.0     # KTO lambda_U
  c.preference.reference = "step"           # reference log-probs: "step" (a forward pass each step) or
                                            # "precompute" (once over the data, cached in the workdir)
  c.sampling.eval_prompts = 256      # distinct held-out prompts sampled at eval (KL to the
                                     # reference, gold reward); 0: pair metrics only
  c.sampling.max_new_tokens = 48     # sampled response length limit (data.prompt_len + this
                                     # <= model.max_len)
  c.sampling.eval_texts = 2          # sampled texts kept in the eval metrics
  return c
