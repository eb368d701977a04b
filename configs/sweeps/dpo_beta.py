"""DPO over beta and three seeds (use with configs/dpo.py)."""


def get_sweep():
  return [{"preference.beta": beta, "seed": seed} for beta in (0.05, 0.1, 0.3, 1.0) for seed in (0, 1, 2)]
