"""Every loss of the DPO family at its default hyper-parameters (the README's table)."""

DEFAULTS = {  # loss -> its paper's (or TRL's) default hyper-parameters
    "sigmoid": {"preference.beta": 0.1},
    "robust": {"preference.beta": 0.1, "preference.label_smoothing": 0.1},
    "ipo": {"preference.beta": 0.1},
    "hinge": {"preference.beta": 0.1},
    "simpo": {"preference.beta": 2.0, "preference.gamma": 0.5},
    "orpo": {"preference.lam": 0.1},
    "kto": {"preference.beta": 0.1},
}


def get_sweep():
  return [{"preference.loss": loss, **hparams} for loss, hparams in DEFAULTS.items()]
