"""Reward registry: lookups name the field, text rewards score decoded texts in-graph, bad
scores become NaN with a message, the sampled evaluation's gold comes from a named reward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ppo as ppo_config
from rlhf_jax import tokenizers
from rlhf_jax.model import sampling
from rlhf_jax.rl import evaluation
from rlhf_jax.rl import models as models_lib
from rlhf_jax.rl import rewards


def letter_count(texts):
  """A user's text reward: the number of 'a' characters, as float32."""
  return np.array([t.count("a") for t in texts], np.float32)


rewards.register_text_reward("test_letter_count", letter_count)
rewards.register_text_reward("test_nan_on_long", lambda texts: np.array(   # passes the probe
    [np.nan if len(t) > 20 else 1.0 for t in texts], np.float32))


def _sample(tokenizer, texts, length=12):
  """A SampleOutput holding `texts` right-padded to `length` (only tokens and mask are read)."""
  tokens = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    ids = tokenizer.encode(text)
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
  zeros = jnp.zeros((len(texts), 1))
  return sampling.SampleOutput(jnp.asarray(tokens), jnp.asarray(mask), zeros, zeros, zeros)


def test_unknown_reward_name_fails_naming_the_field_and_known_names():
  config = ppo_config.get_config()
  config.rl.update(reward="vader", reward_checkpoint="")
  assert {"gold", "model", "test_letter_count"} <= set(rewards.REWARDS.names())
  known = ", ".join(rewards.REWARDS.names())
  with pytest.raises(ValueError, match=rf"config.rl.reward: unknown reward 'vader'; known: {known} "
                                       r"\(.*register_text_reward\)"):
    models_lib.check_config(config)
  with pytest.raises(ValueError, match="config.sampling.gold_reward: unknown reward 'nope'"):
    evaluation.sampled_policy_metrics(None, None, None, None, [], None, None, tokenizer=None,
                                      max_new_tokens=1, num_texts=0, gold_reward="nope")
  with pytest.raises(ValueError, match="config.sampling.gold_reward: reward 'model' is not a "
                                       "text reward"):
    rewards.text_reward("model", "config.sampling.gold_reward")
  with pytest.raises(ValueError, match="'test_letter_count' is registered twice"):
    rewards.register_text_reward("test_letter_count", letter_count)


def test_text_reward_scores_the_decoded_texts_inside_jit():
  config = ppo_config.get_config()
  config.rl.reward = "test_letter_count"
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  texts = ["banana", "xyz", "a a a a"]
  sample = _sample(tokenizer, texts)
  reward_fn = rewards.get(config).make_fn(config, None)
  scores = jax.jit(lambda s: rewards.checked_scores(reward_fn({}, s), 3, "test_letter_count"))(
      sample)
  np.testing.assert_array_equal(scores, [3.0, 0.0, 4.0])
  assert rewards.get(config).texts is letter_count


def test_non_finite_text_scores_are_reported_and_reach_the_step(capfd):
  config = ppo_config.get_config()
  config.rl.reward = "test_nan_on_long"
  tokenizer = tokenizers.make_tokenizer(config.tokenizer)
  reward_fn = rewards.get(config).make_fn(config, None)
  sample = _sample(tokenizer, ["short", "a good deal longer than twenty"], length=32)
  scores = jax.jit(lambda s: rewards.checked_scores(reward_fn({}, s), 2, "test_nan_on_long"))(
      sample)
  jax.effects_barrier()
  np.testing.assert_array_equal(np.isnan(scores), [False, True])
  assert "reward 'test_nan_on_long' returned non-finite scores for 1 of 2" in capfd.readouterr().err


def test_summary_without_gold_has_no_gold_keys():
  texts, lengths = ["a b", "a c d"], [2, 3]
  with_gold = evaluation.summarize_policy(texts, [0.5, -0.5], lengths, num_samples=1)
  without = evaluation.summarize_policy(texts, None, lengths, num_samples=1)
  assert with_gold["gold_mean"] == 0.0 and with_gold["samples"] == [{"text": "a b", "gold": 0.5}]
  assert without["samples"] == [{"text": "a b"}]
  assert {k: v for k, v in with_gold.items() if not k.startswith("gold") and k != "samples"} == {
      k: v for k, v in without.items() if k != "samples"}
