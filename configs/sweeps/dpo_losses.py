"""Every loss of the DPO family at its default hyper-parameters (the README's table)."""

DEFAULTS = {  # loss -> its paper's (or TRL's) default hyper-parameters
    "sigmoid": {"dpo.beta": 0.1},
    "robust": {"dpo.beta": 0.1, "dpo.label_smoothing": 0.1},
    "ipo": {"dpo.beta": 0.1},
    "hinge": {"dpo.beta": 0.1},
    "simpo": {"dpo.beta": 2.0, "dpo.gamma": 0.5},
    "orpo": {"dpo.lam": 0.1},
    "kto": {"dpo.beta": 0.1},
}


def get_sweep():
  return [{"dpo.loss": loss, **hparams} for loss, hparams in DEFAULTS.items()]
