"""Algorithm registry: an unknown name fails naming the field and the known names; each
record's rules (samples per prompt, training rows, own checks) reach the config check."""

import pytest

from configs import online_dpo as online_dpo_config
from configs import ppo as ppo_config
from configs import rloo as rloo_config
from rlhf_jax.rl import algorithms
from rlhf_jax.rl import models as models_lib


def _config(base=ppo_config, **rl_fields):
  config = base.get_config()
  config.rl.update(reward_checkpoint="/nonexistent", **rl_fields)
  return config


def test_unknown_algorithm_fails_naming_the_field_and_known_names():
  known = ", ".join(algorithms.ALGORITHMS.names())
  assert {"grpo", "online_dpo", "ppo", "rloo"} <= set(algorithms.ALGORITHMS.names())
  with pytest.raises(ValueError, match=rf"config.rl.algorithm: unknown RL algorithm 'a2c'; "
                                       rf"known: {known} \(registered in "
                                       r"rlhf_jax/rl/algorithms.py\)"):
    models_lib.check_config(_config(algorithm="a2c"))


def test_records_rules_reach_the_config_check():
  assert [n for n in algorithms.ALGORITHMS if algorithms.ALGORITHMS.get(n).has_critic] == ["ppo"]
  for config in (_config(), _config(rloo_config), _config(online_dpo_config)):
    models_lib.check_config(config)                 # the shipped configs pass
  with pytest.raises(ValueError, match="config.rl.samples_per_prompt: rloo needs >= 2 samples"):
    models_lib.check_config(_config(rloo_config, samples_per_prompt=1))
  # Online DPO trains on pairs: its 64 prompts make 64 rows, whatever samples_per_prompt.
  with pytest.raises(ValueError, match="config.rl.num_minibatches: the rollout's 64 pairs"):
    models_lib.check_config(_config(online_dpo_config, num_minibatches=3))
  with pytest.raises(ValueError, match="config.rl.num_minibatches: the rollout's 64 responses"):
    models_lib.check_config(_config(rloo_config, num_minibatches=3))
  with pytest.raises(ValueError, match="config.rl.dpo_loss: expected one of"):
    models_lib.check_config(_config(online_dpo_config, dpo_loss="simpo"))
