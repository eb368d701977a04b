"""Rewards by name (`config.rl.reward`): the learned reward model, or any host "text reward".

A text reward is a Python callable `texts -> [batch]` float scores (a verifier, a
classifier, the testbed's VADER gold reward); `register_text_reward(name, fn)` makes it
usable as `config.rl.reward` in the rollout and as `config.sampling.gold_reward` in the
sampled evaluation. In the rollout it is scored on the decoded prompt + response through
`jax.pure_callback`, so the RL step stays one pure function; every reward's scores are
checked (shape at trace time, finiteness on the host each step).
"""

import dataclasses
import sys
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import registry
from rlhf_jax import tokenizers
from rlhf_jax.model import sampling
from rlhf_jax.stages import reward as reward_lib

# reward_fn(extras, sample) -> scores [batch] float32, traced inside the RL step.
RewardFn = Callable[[Any, sampling.SampleOutput], jax.Array]
# texts -> scores [len(texts)], run on the host.
TextReward = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Reward:
  """A reward as a record.

  make_fn(config, models) -> RewardFn: the in-graph scorer of the rollout (`models` is
    `rl.models.Models`).
  uses_reward_model: reads a learned reward model from `config.rl.reward_checkpoint`.
  texts: the host scorer of a text reward (None for the learned model); the sampled
    evaluation calls it directly.
  """
  name: str
  make_fn: Callable[[ml_collections.ConfigDict, Any], RewardFn]
  uses_reward_model: bool = False
  texts: TextReward | None = None


REWARDS: registry.Registry[Reward] = registry.Registry(
    "reward", "config.rl.reward",
    hint="a text reward is added with rlhf_jax.rl.rewards.register_text_reward")


def get(config: ml_collections.ConfigDict) -> Reward:
  """The record named by `config.rl.reward` (ValueError naming the known ones)."""
  return REWARDS.get(config.rl.reward)


def text_reward(name: str, field: str) -> TextReward:
  """The host scorer of the text reward `name`, read from config `field`."""
  reward = REWARDS.get(name, field)
  if reward.texts is None:
    raise ValueError(f"{field}: reward {name!r} is not a text reward (texts -> scores); text "
                     f"rewards: {', '.join(n for n in REWARDS.names() if REWARDS.get(n).texts)}")
  return reward.texts


# ------------------------------------------------------------------------ checks

def _report_bad_scores(scores, name: str) -> None:
  """Host-side check run every iteration; never raises (an exception in a callback of a
  multi-device program deadlocks its collectives): it logs, and the NaN reaches the loss."""
  scores = np.asarray(scores)
  bad = ~np.isfinite(scores)
  if bad.any():
    message = (f"reward {name!r} returned non-finite scores for {int(bad.sum())} of "
               f"{scores.size} responses (rows {np.flatnonzero(bad)[:8].tolist()}, values "
               f"{scores[bad][:4].tolist()}); the loss is made NaN and the run stops")
    logging.error(message)
    print(f"ERROR: {message}", file=sys.stderr, flush=True)


def checked_scores(scores, batch: int, name: str) -> jax.Array:
  """Checks a reward function's output: static shape now, finiteness on the host each step."""
  if getattr(scores, "shape", None) != (batch,):
    raise ValueError(f"reward {name!r} returned shape {getattr(scores, 'shape', None)}, "
                     f"expected [batch] = ({batch},) (config.rl.reward)")
  scores = scores.astype(jnp.float32)
  jax.debug.callback(_report_bad_scores, replicated(scores), name)
  return scores


def replicated(x: jax.Array) -> jax.Array:
  """`x` gathered whole onto every device (inside a mesh), as a host callback needs it."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())


# ------------------------------------------------------------------------ the learned model

def model_reward_fn(model, pooling: str = "last") -> RewardFn:
  """The learned reward model, in-graph (`reward.score`)."""
  def reward_fn(extras, sample):
    return reward_lib.score(model, extras["reward"], sample.tokens, sample.mask, pooling)
  return reward_fn


REWARDS.register("model", Reward(
    "model", lambda config, models: model_reward_fn(models.reward, models.reward_pooling),
    uses_reward_model=True))


# ------------------------------------------------------------------------ text rewards

def decode_texts(tokenizer, tokens, mask) -> list[str]:
  """Decoded `[batch, seq]` sequences, masked-out tokens dropped."""
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  return [tokenizer.decode(t[m != 0]) for t, m in zip(tokens, mask)]


def _describe(fn: TextReward) -> str:
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _text_scores_on_host(name: str, fn: TextReward, tokenizer, tokens, mask) -> np.ndarray:
  texts = decode_texts(tokenizer, tokens, mask)
  try:
    scores = np.asarray(fn(texts), np.float32)
  except Exception as e:  # pylint: disable=broad-except
    scores, problem = None, f"raised {type(e).__name__}: {e}"
  else:
    problem = None if scores.shape == (len(texts),) else (
        f"returned shape {scores.shape}, expected ({len(texts)},)")
  if problem:
    # Never raise inside a callback (see _report_bad_scores): NaN stops the run.
    message = f"reward {name!r} ({_describe(fn)}) {problem}"
    logging.error(message)
    print(f"ERROR: {message}", file=sys.stderr, flush=True)
    return np.full((len(texts),), np.nan, np.float32)
  return scores


def text_reward_fn(name: str, fn: TextReward, tokenizer) -> RewardFn:
  """A text reward of prompt + response, through `jax.pure_callback`."""
  def reward_fn(extras, sample):
    del extras
    tokens, mask = replicated(sample.tokens), replicated(sample.mask)
    return jax.pure_callback(
        lambda t, m: _text_scores_on_host(name, fn, tokenizer, t, m),
        jax.ShapeDtypeStruct(tokens.shape[:1], jnp.float32), tokens, mask)
  return reward_fn


def check_text_reward(name: str, fn: TextReward) -> None:
  """Fails fast, in the main thread, if `fn` is not texts -> finite [batch]."""
  probe = ["The film is great.", "The film is awful."]
  scores = np.asarray(fn(probe))
  if scores.shape != (2,) or not np.all(np.isfinite(scores)):
    raise ValueError(f"reward {name!r}: {_describe(fn)} on {len(probe)} probe texts returned "
                     f"shape {scores.shape} {scores.ravel()[:4].tolist()}; expected "
                     f"{len(probe)} finite scores")


def register_text_reward(name: str, fn: TextReward) -> Reward:
  """Registers `fn` (texts -> `[batch]` float scores) as reward `name`; returns its record."""
  def make_fn(config, models):
    del models
    check_text_reward(name, fn)
    return text_reward_fn(name, fn, tokenizers.make_tokenizer(config.tokenizer))
  return REWARDS.register(name, Reward(name, make_fn, texts=fn))


# ------------------------------------------------------------------------ built-in rewards
# defined elsewhere, registered on import: "judge" (direct RLAIF, the judge's verdict as the
# reward). At the bottom: direct.py imports this module, whose names are all defined by now.
from rlhf_jax.feedback import direct as _direct  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import
