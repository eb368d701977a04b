"""Sampled policy evaluation, for any stage: one response per held-out prompt, scored.

The DPO paper's sentiment frontier (Rafailov et al. 2023, fig. 2 left) plots mean gold
reward against the sequence-level KL(pi || pi_ref); these functions compute both with
standard errors, plus length and diversity (distinct-n) to expose reward hacking. The
"gold" reward is the text reward named by `config.sampling.gold_reward` (`rl.rewards`;
"" reports no gold metrics).
"""

import functools
import math
from typing import Optional, Sequence

import jax
import numpy as np

from rlhf_jax.model import sampling
from rlhf_jax.rl import rewards
from rlhf_jax.rl import rollout as rollout_lib
from rlhf_jax.stages import reward as reward_lib
from rlhf_jax.train import sharding as sharding_lib


def sequence_kl_estimate(policy_logprobs, ref_logprobs, mask) -> tuple[float, float]:
  """Monte-Carlo estimate of the sequence-level KL(pi || pi_ref) from samples of pi.

  KL = E_{y ~ pi}[log pi(y) - log pi_ref(y)], with log pi(y) the sum over response
  tokens. Each sequence gives an unbiased (possibly negative) estimate; we return their
  mean and its standard error std / sqrt(B) (ddof=1; NaN when B == 1). The log-probs
  must be of the distribution that was sampled (temperature 1 for the policy's KL).

  Args:
    policy_logprobs: `[B, N]` log pi of the sampled tokens.
    ref_logprobs: `[B, N]` log pi_ref of the same tokens.
    mask: `[B, N]` 1 on response tokens, 0 on padding.

  Returns:
    (mean, standard_error) as Python floats.
  """
  logp = np.asarray(policy_logprobs, np.float64)
  ref = np.asarray(ref_logprobs, np.float64)
  m = np.asarray(mask, np.float64)
  if logp.ndim != 2 or logp.shape != ref.shape or logp.shape != m.shape:
    raise ValueError("evaluation.sequence_kl_estimate: policy_logprobs, ref_logprobs and "
                     f"mask must share one [B, N] shape, got {logp.shape}, {ref.shape}, "
                     f"{m.shape}")
  if logp.shape[0] == 0:
    raise ValueError("evaluation.sequence_kl_estimate: empty batch")
  # Zero padding before subtracting: -inf log-probs there must not make NaN.
  real = m > 0
  per_seq = ((np.where(real, logp, 0.0) - np.where(real, ref, 0.0)) * m).sum(axis=1)
  b = per_seq.shape[0]
  se = float(per_seq.std(ddof=1) / math.sqrt(b)) if b > 1 else float("nan")
  return float(per_seq.mean()), se


def distinct_n(texts: Sequence[str], n: int) -> float:
  """Unique n-grams of words over all texts / total n-grams (0 if there are none).

  Words are whitespace-separated; n-grams do not cross text boundaries.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"evaluation.distinct_n: n must be an int >= 1, got {n!r}")
  unique, total = set(), 0
  for text in texts:
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    unique.update(grams)
    total += len(grams)
  return len(unique) / total if total else 0.0


def _json_float(x) -> Optional[float]:
  x = float(x)
  return x if math.isfinite(x) else None


def summarize_policy(texts: Sequence[str], gold_scores, lengths,
                     kl: Optional[tuple[float, float]] = None,
                     num_samples: int = 4) -> dict:
  """JSON-serialisable summary of one policy's samples.

  Args:
    texts: `[B]` sampled responses (or prompt + response).
    gold_scores: `[B]` gold rewards of `texts`, or None (no gold_* keys, samples without gold).
    lengths: `[B]` response lengths in tokens.
    kl: optional (mean, standard_error) from `sequence_kl_estimate`.
    num_samples: how many (text, gold) examples to keep, the first ones.

  Returns:
    {'num', 'gold_mean', 'gold_std', 'gold_stderr', 'length_mean', 'distinct_1',
    'distinct_2', 'kl', 'kl_stderr', 'samples': [{'text', 'gold'}]}; std and
    stderr use ddof=1; non-finite values (a stderr from B == 1, no KL) are None.
  """
  lens = np.asarray(lengths, np.float64)
  b = len(texts)
  if b == 0:
    raise ValueError("evaluation.summarize_policy: no texts")
  gold = None if gold_scores is None else np.asarray(gold_scores, np.float64)
  if (gold is not None and gold.shape != (b,)) or lens.shape != (b,):
    raise ValueError(f"evaluation.summarize_policy: gold_scores "
                     f"{None if gold is None else gold.shape} and lengths {lens.shape} must "
                     f"both be [{b}] like texts")
  kl_mean, kl_se = kl if kl is not None else (float("nan"), float("nan"))
  samples = [{"text": str(t)} for t in texts[:num_samples]]
  summary = {"num": b}
  if gold is not None:
    std = gold.std(ddof=1) if b > 1 else float("nan")
    summary.update(gold_mean=_json_float(gold.mean()), gold_std=_json_float(std),
                   gold_stderr=_json_float(std / math.sqrt(b)))
    for sample, g in zip(samples, gold):
      sample["gold"] = _json_float(g)
  summary.update(length_mean=_json_float(lens.mean()), distinct_1=distinct_n(texts, 1),
                 distinct_2=distinct_n(texts, 2), kl=_json_float(kl_mean),
                 kl_stderr=_json_float(kl_se), samples=samples)
  return summary


@functools.cache
def _sample_fn(policy, reference, reward, pooling: str, max_new_tokens: int, eos_id: int,
               pad_id: int):
  @jax.jit
  def fn(policy_params, reference_params, reward_params, batch, rng):
    sample = sampling.sample(policy_params, policy, batch["prompt_tokens"], batch["prompt_mask"],
                             rng, max_new_tokens=max_new_tokens, temperature=1.0, eos_id=eos_id,
                             pad_id=pad_id)
    p = batch["prompt_tokens"].shape[1]
    ref = rollout_lib.response_outputs(reference, reference_params, sample.tokens, sample.mask,
                                       p)["logprobs"]
    out = {"tokens": sample.tokens, "mask": sample.mask, "response_mask": sample.response_mask,
           "logprobs": sample.logprobs, "ref_logprobs": ref}
    if reward is not None:
      out["rm_score"] = reward_lib.score(reward, reward_params, sample.tokens, sample.mask, pooling)
    return out
  return fn


def sampled_policy_metrics(policy, policy_params, reference, reference_params, prompt_batches,
                           mesh, rng, *, tokenizer, max_new_tokens: int, num_texts: int,
                           reward=None, reward_params=None, pooling: str = "last",
                           gold_reward: str = "gold") -> dict:
  """One response (temperature 1) per held-out prompt: gold reward (mean, std, stderr),
  MC sequence KL(pi || pi_ref) with its standard error, response length, distinct-n,
  the fraction ending in EOS, the learned reward (`rm_score`, when `reward` is given),
  and `samples`: the first `num_texts` texts (prompt + response) with their gold.

  prompt_batches: host batches of left-padded `prompt_tokens`, `prompt_mask` `[batch, P]`
  and `valid` `[batch]`.
  gold_reward: the text reward (`config.sampling.gold_reward`) of prompt + response that
  gives the gold metrics; "" for none.
  """
  gold_fn = (rewards.text_reward(gold_reward, "config.sampling.gold_reward")
             if gold_reward else None)
  fn = _sample_fn(policy, reference, reward, pooling, max_new_tokens, tokenizer.eos_id,
                  tokenizer.pad_id)
  columns, p = {}, None
  for i, batch in enumerate(prompt_batches):
    p = batch["prompt_tokens"].shape[1]
    batch = sharding_lib.put_batch(batch, mesh)   # multi-host: gather outputs and rows alike
    out, valid = sharding_lib.to_host((fn(policy_params, reference_params, reward_params, batch,
                                          jax.random.fold_in(rng, i)), batch["valid"]))
    valid = np.asarray(valid) == 1
    for k, v in out.items():
      columns.setdefault(k, []).append(np.asarray(v)[valid])
  if not columns:
    raise ValueError("sampled evaluation: the eval split gave no prompt batches")
  c = {k: np.concatenate(v) for k, v in columns.items()}
  texts = rewards.decode_texts(tokenizer, c["tokens"], c["mask"])
  responses = rewards.decode_texts(tokenizer, c["tokens"][:, p:], c["mask"][:, p:])
  gold = None if gold_fn is None else gold_fn(texts)
  kl = sequence_kl_estimate(c["logprobs"], c["ref_logprobs"], c["response_mask"])
  summary = summarize_policy(responses, gold, c["response_mask"].sum(axis=1), kl=kl,
                             num_samples=0)
  samples = (texts[:num_texts] if gold is None else
             [f"{t}  [gold {g:+.2f}]" for t, g in zip(texts[:num_texts], gold[:num_texts])])
  summary.update(
      samples=samples,
      eos_fraction=float(np.mean(np.any((c["tokens"][:, p:] == tokenizer.eos_id)
                                        & (c["mask"][:, p:] != 0), axis=1))))
  if "rm_score" in c:
    summary["rm_score"] = float(np.mean(c["rm_score"]))
  return summary
