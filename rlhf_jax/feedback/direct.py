"""Direct RLAIF (d-RLAIF, Lee et al. 2023, Sec. 2.3): the AI judge's score of each sampled
response is the reward of the RL stage itself, with no reward model in between.

The constitution's `verdict` template asks the judge a yes/no question about one
response (a principle's `verdict_question`); the score is the judge's two-option
log-odds at the answer position,

  score = 1/S sum_s [logit_s[yes] - logit_s[no]] = 1/S sum_s log P_s(yes) / P_s(no)

with P_s the softmax over the two `verdict_options` tokens, averaged over the S chosen
principles ('all', or one principle's name). Lee et al. have the judge rate 1-10 and
take the probability-weighted score; a yes/no log-odds reads the same next-token
probabilities with one forward pass, and is unbounded where the rating is not.

Registered as reward "judge" (`config.rl.reward = "judge"`; imported by `rl.rewards`):
the rollout's prompt and response tokens are decoded separately with the policy's
tokenizer (the template places them apart), rendered, re-encoded with the judge's
tokenizer and scored on the host through `jax.pure_callback`; the judge's own jitted
forward (`judge.last_token_logits`) runs inside the callback. Config: `config.rl.judge`,
`judge_constitution`, `judge_principles`, `judge_prompt_format`, `judge_batch_size`
(configs/ppo.py).
"""

import functools
import os
import sys
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import tokenizers
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import judge
from rlhf_jax.feedback import models
from rlhf_jax.rl import rewards

NAME = "judge"
BUCKET = 32   # judge rows are padded to a multiple of this many tokens (one compile each)


def verdict_principles(constitution: constitution_lib.Constitution,
                       principles: str = "all") -> tuple[int, ...]:
  """Indices of the principles a verdict averages over: 'all' or one principle's name."""
  where = constitution.path or constitution.name
  if not constitution.has_verdict:
    raise ValueError(f"{where}: no templates.verdict (direct RLAIF asks the judge a yes/no "
                     "question per principle; add templates.verdict, verdict_options and "
                     "principles[i].verdict_question)")
  if principles == "all":
    return tuple(i for i, p in enumerate(constitution.principles) if p.verdict_question)
  names = [p.name for p in constitution.principles]
  if principles not in names:
    raise ValueError(f"principles={principles!r}: expected 'all' or a principle of {where} "
                     f"({', '.join(names)})")
  return (names.index(principles),)


def verdict_text(constitution: constitution_lib.Constitution,
                 fmt: constitution_lib.PromptFormat, prompt: str, response: str,
                 principle: int) -> str:
  """The text the judge continues with its yes/no label."""
  return fmt.render(constitution.turn(
      "verdict", prompt=prompt, response=response,
      question=constitution.principles[principle].verdict_question))


def verdict_scores(lm: models.LanguageModel, constitution: constitution_lib.Constitution,
                   fmt: constitution_lib.PromptFormat, prompts: Sequence[str],
                   responses: Sequence[str], principles: str = "all", batch_size: int = 16,
                   bucket: int = BUCKET) -> np.ndarray:
  """[N] float64: the judge's log-odds logit[yes] - logit[no] after each rendered verdict
  text, averaged over the principles ('all' or a name). N * S judge rows, batched as
  `judge.option_logits`."""
  if len(prompts) != len(responses):
    raise ValueError(f"verdict_scores: {len(prompts)} prompts and {len(responses)} responses "
                     "must be as many")
  chosen = verdict_principles(constitution, principles)
  if not prompts:
    return np.zeros((0,), np.float64)
  option_ids = judge.option_token_ids(
      lm, constitution.verdict_options,
      f"{constitution.path or constitution.name}: field verdict_options")
  texts = [verdict_text(constitution, fmt, p, r, s)          # row i * S + s
           for p, r in zip(prompts, responses) for s in chosen]
  logits = judge.option_logits(lm, models.encode(lm, texts, fmt.add_bos), option_ids,
                               batch_size=batch_size, bucket=bucket).astype(np.float64)
  gaps = (logits[:, 0] - logits[:, 1]).reshape(len(prompts), len(chosen))
  return gaps.mean(axis=1)


# ------------------------------------------------------------------------ the reward

def config_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Each bad `config.rl.judge*` field of reward 'judge', as `config.<field>=<value>: why`
  (train/validate.py reports them at start-up)."""
  rl, out = config.rl, []
  path = rl.get("judge", "")
  if not path:
    out.append("config.rl.judge='': reward 'judge' needs the judge: an rlhf_jax run's "
               "workdir or a Hugging Face model directory")
  elif not os.path.isfile(os.path.join(path, "config.json")):
    out.append(f"config.rl.judge={path!r}: no config.json there (expected an rlhf_jax run's "
               "workdir or a Hugging Face model directory)")
  file = rl.get("judge_constitution", "")
  if not file:
    out.append("config.rl.judge_constitution='': reward 'judge' needs a constitution file "
               "with a verdict template (templates.verdict)")
  else:
    principles = rl.get("judge_principles", "all")
    try:
      constitution = constitution_lib.load(file)
    except constitution_lib.ConstitutionError as e:
      out.append(f"config.rl.judge_constitution={file!r}: {e}")
    else:
      names = [p.name for p in constitution.principles]
      if not constitution.has_verdict:
        out.append(f"config.rl.judge_constitution={file!r}: the file has no templates.verdict "
                   "(reward 'judge' asks the judge a yes/no question per principle: add "
                   "templates.verdict, verdict_options and principles[i].verdict_question)")
      elif principles != "all" and principles not in names:
        out.append(f"config.rl.judge_principles={principles!r}: expected 'all' or a principle "
                   f"of {file} ({', '.join(names)})")
  size = rl.get("judge_batch_size", 16)
  if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
    out.append(f"config.rl.judge_batch_size={size!r}: expected an int >= 1")
  kind = rl.get("judge_prompt_format", "auto")
  if kind not in ("auto",) + tuple(constitution_lib.FORMATS):
    out.append(f"config.rl.judge_prompt_format={kind!r}: expected 'auto', 'plain' or 'chat'")
  return out


@functools.lru_cache(maxsize=4)
def _load_judge(path: str) -> models.LanguageModel:
  """The judge, loaded once per process (make_step may be called more than once)."""
  return models.load(path)


def _report(message: str) -> None:
  logging.error(message)
  print(f"ERROR: {message}", file=sys.stderr, flush=True)


def _scores_on_host(score_texts, tokenizer, prompt_tokens, prompt_mask, response_tokens,
                    response_mask) -> np.ndarray:
  """Decodes prompts and responses, scores them; never raises inside the callback (see
  `rewards._report_bad_scores`): a failure is logged and NaN stops the run."""
  prompts = rewards.decode_texts(tokenizer, prompt_tokens, prompt_mask)
  responses = rewards.decode_texts(tokenizer, response_tokens, response_mask)
  try:
    scores = np.asarray(score_texts(prompts, responses), np.float32)
  except Exception as e:  # pylint: disable=broad-except
    _report(f"reward {NAME!r} raised {type(e).__name__}: {e}")
    return np.full((len(prompts),), np.nan, np.float32)
  return scores


def judge_reward_fn(score_texts, tokenizer) -> rewards.RewardFn:
  """A reward of (prompt texts, response texts) -> [batch] scores, through
  `jax.pure_callback`; the prompt is the sample's first P = tokens - response columns."""
  def reward_fn(extras, sample):
    del extras
    p = sample.tokens.shape[1] - sample.response_tokens.shape[1]
    args = [rewards.replicated(x) for x in (sample.tokens[:, :p], sample.mask[:, :p],
                                             sample.response_tokens, sample.response_mask)]
    return jax.pure_callback(
        lambda *a: _scores_on_host(score_texts, tokenizer, *a),
        jax.ShapeDtypeStruct(sample.tokens.shape[:1], jnp.float32), *args)
  return reward_fn


def make_reward_fn(config: ml_collections.ConfigDict, models_=None) -> rewards.RewardFn:
  """Reward 'judge' from `config.rl.judge*`: loads the judge and the constitution,
  checks the verdict labels are one judge token each (ValueError naming the field)."""
  del models_
  found = config_problems(config)
  if found:
    raise ValueError("reward 'judge': " + "; ".join(found))
  rl = config.rl
  lm = _load_judge(os.path.abspath(rl.judge))
  constitution = constitution_lib.load(rl.judge_constitution)
  fmt = constitution_lib.make_format(constitution, rl.get("judge_prompt_format", "auto"),
                                     lm.chat_template, lm.special_tokens)
  principles = rl.get("judge_principles", "all")
  batch_size = rl.get("judge_batch_size", 16)
  judge.option_token_ids(lm, constitution.verdict_options,   # fails now, not in the callback
                         f"config.rl.judge_constitution={rl.judge_constitution!r}: field "
                         "verdict_options")

  def score_texts(prompts, responses):
    return verdict_scores(lm, constitution, fmt, prompts, responses, principles, batch_size)

  return judge_reward_fn(score_texts, tokenizers.make_tokenizer(config.tokenizer))


rewards.REWARDS.register(NAME, rewards.Reward(NAME, make_reward_fn))
