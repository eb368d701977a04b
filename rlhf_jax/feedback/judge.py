"""The AI labeller (RLAIF, Lee et al. 2023): a judge model's preference between two
responses, read from its next-token probabilities of the two option labels.

For a pair (prompt, a, b) and a principle, the comparison template is rendered twice,
with a shown first and with b shown first. In each order the judge's logits at the two
option tokens (say "A", "B") give P(first) = softmax(logits[A], logits[B])[0], i.e.
sigmoid(gap) with gap = logit[A] - logit[B] (Lee et al. 2023, Sec. 2.1: the
probabilities of the option tokens, normalised over the options). Averaging the two
orders cancels the judge's position bias:

  P(a > b) = 1/(2S) sum_s [sigmoid(gap_ab_s) + sigmoid(-gap_ba_s)]     (S principles)

`margin` is the log-odds log P(a > b) - log P(b > a), computed from log-sigmoids so it
is finite even where P rounds to 0 or 1, and antisymmetric to the last bit: swapping a
and b (same logits) negates it. A pair is labelled by its sign (0: a tie, not labelled);
the preference dataset keeps |margin| in the `margin` column, so sigmoid(margin) =
P(chosen > rejected) is the soft target for Bradley-Terry
(`objectives.bradley_terry.soft_bradley_terry_loss`).

One forward pass per padded batch, jitted once per (batch, length) shape: rows are
sorted by length and padded to a multiple of `bucket`; only the last position's logits
at the option tokens leave the device.
"""

import functools
import itertools
import json
import os
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import tfds_builders
from rlhf_jax.feedback import constitution as constitution_lib
from rlhf_jax.feedback import models
from rlhf_jax.model import sampling
from rlhf_jax.model import transformer

MARGIN_KIND = "judge_log_odds"   # metadata['margin']: what the margin column holds


@functools.partial(jax.jit, static_argnames=("model",))
def last_token_logits(params, model, tokens, mask, option_ids):
  """Next-token logits at `option_ids` after each left-padded prompt.

  tokens, mask: [B, L] int32, left-padded (the last column is every row's last token).
  option_ids: [K] int32. Returns [B, K] float32.
  The first L-1 tokens go through the KV cache (their logits are never computed:
  unused, XLA drops them), then the last token alone, as the sampler's prefill does.
  """
  b, length = tokens.shape
  positions = sampling.prompt_positions(mask)
  cache = transformer.init_cache(model.config, b, length)
  variables = {"params": params}
  _, cache = model.apply(variables, tokens[:, :-1], positions[:, :-1], mask, cache)
  outputs, _ = model.apply(variables, tokens[:, -1:], positions[:, -1:], mask, cache)
  return jnp.take(outputs["logits"][:, -1], option_ids, axis=-1)


def option_token_ids(lm: models.LanguageModel, options: Sequence[str],
                     where: str = "options") -> np.ndarray:
  """[K] int32: each option must be exactly one token of the judge's tokenizer."""
  ids = []
  for option in options:
    encoded = lm.tokenizer.encode(option)
    if len(encoded) != 1:
      raise ValueError(f"{where}: option {option!r} is {len(encoded)} tokens {encoded} of the "
                       f"judge's tokenizer ({lm.source}); each option must be one token")
    ids.append(encoded[0])
  if len(set(ids)) != len(ids):
    raise ValueError(f"{where}: options {list(options)} map to the same token ids {ids}")
  return np.asarray(ids, np.int32)


def option_logits(lm: models.LanguageModel, ids: Sequence[Sequence[int]], option_ids,
                  *, batch_size: int = 16, bucket: int = 32,
                  on_batch: Callable[[int], None] | None = None) -> np.ndarray:
  """[N, K] float32 logits of the option tokens after each token sequence `ids[i]`.

  Rows are run in order of length (shortest first), `batch_size` at a time (the last
  batch padded with copies), each padded to a multiple of `bucket` tokens.
  `on_batch(rows_done)` is called after each batch.
  """
  if batch_size < 1:
    raise ValueError(f"judge batch_size must be >= 1, got {batch_size}")
  models.check_lengths(lm, ids, 0, "judge prompt")
  order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
  out = np.zeros((len(ids), len(option_ids)), np.float32)
  option_ids = jnp.asarray(option_ids, jnp.int32)
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    tokens, mask = models.pad_left([ids[i] for i in rows], batch_size, lm.tokenizer.pad_id,
                                   bucket, lm.max_len)
    logits = last_token_logits(lm.params, lm.model, tokens, mask, option_ids)
    out[rows] = np.asarray(jax.device_get(logits))[:len(rows)]
    if on_batch:
      on_batch(start + len(rows))
  return out


class Judgements(NamedTuple):
  """The judge's verdicts on N pairs under S principles each (numpy)."""
  gap_ab: np.ndarray       # [N, S] float32 logit[first] - logit[second], a shown first
  gap_ba: np.ndarray       # [N, S] float32 the same with b shown first
  principles: list         # [N] tuples of principle indices
  log_prob_a: np.ndarray   # [N] float64 log P(a > b), both orders and principles averaged
  log_prob_b: np.ndarray   # [N] float64 log P(b > a)

  @property
  def margin(self) -> np.ndarray:
    """[N] float64 log-odds of a over b; swapping a and b negates it exactly."""
    return self.log_prob_a - self.log_prob_b

  @property
  def prob_a(self) -> np.ndarray:
    return np.exp(self.log_prob_a)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def combine(gap_ab: np.ndarray, gap_ba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(log P(a > b), log P(b > a)) [N] from the [N, S] gaps of both orders.

  P(a > b) = mean over principles and orders of P(a chosen); each principle's two terms
  are added first (a commutative pair), so swapping a and b swaps the two outputs exactly.
  """
  slots = gap_ab.shape[1]
  per_a = np.logaddexp(_log_sigmoid(gap_ab), _log_sigmoid(-gap_ba))   # [N, S]
  per_b = np.logaddexp(_log_sigmoid(-gap_ab), _log_sigmoid(gap_ba))
  norm = np.log(2.0 * slots)
  return (np.logaddexp.reduce(per_a, axis=1) - norm, np.logaddexp.reduce(per_b, axis=1) - norm)


def comparison_text(constitution: constitution_lib.Constitution,
                    fmt: constitution_lib.PromptFormat, prompt: str, first: str, second: str,
                    principle: int) -> str:
  return fmt.render(constitution.turn(
      "comparison", prompt=prompt, response_a=first, response_b=second,
      question=constitution.principles[principle].comparison_question))


def judge_pairs(lm: models.LanguageModel, constitution: constitution_lib.Constitution,
                fmt: constitution_lib.PromptFormat, prompts: Sequence[str],
                responses_a: Sequence[str], responses_b: Sequence[str],
                principles: Sequence[Sequence[int]], *, batch_size: int = 16,
                bucket: int = 32, progress: models.Progress | None = None) -> Judgements:
  """The judge's verdict on each pair (prompt[i], a[i], b[i]) under principles[i].

  Every pair is judged in both orders under each of its principles (all pairs the same
  number S of principles); 2 * N * S forward rows, batched.
  """
  n = len(prompts)
  if not len(responses_a) == len(responses_b) == len(principles) == n:
    raise ValueError(f"judge_pairs: {n} prompts, {len(responses_a)} a, {len(responses_b)} b "
                     f"and {len(principles)} principle sets must be as many")
  slots = {len(p) for p in principles}
  if n == 0 or len(slots) != 1 or 0 in slots:
    raise ValueError("judge_pairs: needs >= 1 pair, each with the same number (>= 1) of "
                     f"principles (found {sorted(slots)})")
  slots = slots.pop()
  option_ids = option_token_ids(lm, constitution.options,
                                f"{constitution.path or constitution.name}: field options")
  texts = []                              # row = (pair i, slot s, order o): 2 * (i * S + s) + o
  for i in range(n):
    for principle in principles[i]:
      texts.append(comparison_text(constitution, fmt, prompts[i], responses_a[i],
                                   responses_b[i], principle))
      texts.append(comparison_text(constitution, fmt, prompts[i], responses_b[i],
                                   responses_a[i], principle))
  ids = models.encode(lm, texts, fmt.add_bos)
  rows_per_pair = 2 * slots
  on_batch = (lambda rows: progress.update(rows / rows_per_pair)) if progress else None
  logits = option_logits(lm, ids, option_ids, batch_size=batch_size, bucket=bucket,
                         on_batch=on_batch).reshape(n, slots, 2, 2)
  gaps = logits[..., 0] - logits[..., 1]                       # [N, S, order]
  log_a, log_b = combine(gaps[..., 0], gaps[..., 1])
  return Judgements(gaps[..., 0], gaps[..., 1], [tuple(p) for p in principles], log_a, log_b)


def position_bias(j: Judgements) -> dict:
  """How much the judge favours the first-shown response, before and after the swap.

  before: p_first_mean - 0.5, with p_first = sigmoid(gap) the single-order probability
    that the first-shown response wins (an unbiased judge: 0.5 on average);
    first_wins_rate: the fraction of single-order verdicts won by the first shown;
    order_consistency: the fraction of (pair, principle) whose two single-order
    verdicts pick the same response (Lee et al. 2023 report its complement).
  after: position_bias_after = mean |P(a > b) + P(b > a) - 1|, the asymmetry left once
    both orders are averaged (0 up to rounding, by construction);
    first_chosen_rate: the fraction of pairs whose label picks a (the pair's first).
  """
  gaps = np.concatenate([j.gap_ab.reshape(-1), j.gap_ba.reshape(-1)]).astype(np.float64)
  p_first = np.exp(_log_sigmoid(gaps))
  p_a, p_b = np.exp(j.log_prob_a), np.exp(j.log_prob_b)
  return {
      "p_first_mean": float(p_first.mean()),
      "position_bias_before": float(p_first.mean() - 0.5),
      "first_wins_rate": float((gaps > 0).mean()),
      "order_consistency": float(((j.gap_ab > 0) == (j.gap_ba < 0)).mean()),
      "position_bias_after": float(np.abs(p_a + p_b - 1.0).mean()),
      "first_chosen_rate": float((j.margin > 0).mean()),
  }


def preference_records(prompts: Sequence[str], responses_a: Sequence[str],
                       responses_b: Sequence[str], judgements: Judgements,
                       scores_a: Sequence[float] | None = None,
                       scores_b: Sequence[float] | None = None) -> tuple[list, dict]:
  """(records in the preference dataset format, stats). Pairs are labelled by the sign of
  the margin; a margin of exactly 0 is a tie (counted, not labelled). `margin` = |log-odds|
  (>= 0), so sigmoid(margin) = P(chosen > rejected). With gold scores the records carry
  chosen_score / rejected_score and stats the agreement with gold (gold ties excluded)."""
  with_scores = scores_a is not None
  records, agree, decided = [], 0, 0
  for i, m in enumerate(judgements.margin):
    if m == 0:
      continue
    a_wins = m > 0
    record = {"prompt": prompts[i],
              "chosen": responses_a[i] if a_wins else responses_b[i],
              "rejected": responses_b[i] if a_wins else responses_a[i],
              "margin": float(abs(m))}
    if with_scores:
      chosen, rejected = ((scores_a[i], scores_b[i]) if a_wins else (scores_b[i], scores_a[i]))
      record.update(chosen_score=float(chosen), rejected_score=float(rejected))
      if chosen != rejected:
        decided += 1
        agree += int(chosen > rejected)
    records.append(record)
  stats = {"pairs": len(prompts), "labelled": len(records), "ties": len(prompts) - len(records),
           "mean_prob_chosen": float(np.exp(_log_sigmoid(np.abs(judgements.margin))).mean())}
  if with_scores:
    stats.update(agree_with_gold=agree, gold_decided=decided,
                 agreement_rate=agree / decided if decided else 0.0)
  stats.update(position_bias(judgements))
  return records, stats


def principle_agreement(judgements: Judgements, names: Sequence[str], scores_a, scores_b
                        ) -> dict:
  """Agreement with gold of the pairs judged under each single principle (mode 'sample'
  or a named principle): {name: {'pairs', 'agreement_rate'}}."""
  out = {}
  gold = np.sign(np.asarray(scores_a, np.float64) - np.asarray(scores_b, np.float64))
  for index, name in enumerate(names):
    rows = np.array([p == (index,) for p in judgements.principles])
    rows &= (gold != 0) & (judgements.margin != 0)
    if rows.any():
      out[name] = {"pairs": int(rows.sum()), "agreement_rate": float(
          (np.sign(judgements.margin[rows]) == gold[rows]).mean())}
  return out


def judgement_rows(prompts, responses_a, responses_b, judgements: Judgements,
                   names: Sequence[str]) -> list[dict]:
  """One JSON-serialisable dict per pair, for inspection: the texts, the principles, the
  single-order probabilities of a, the averaged P(a > b), the margin and the label."""
  rows = []
  for i in range(len(prompts)):
    p_first = np.exp(_log_sigmoid(judgements.gap_ab[i]))
    p_second = np.exp(_log_sigmoid(-judgements.gap_ba[i]))
    m = float(judgements.margin[i])
    rows.append({
        "prompt": prompts[i], "response_a": responses_a[i], "response_b": responses_b[i],
        "principles": [names[p] for p in judgements.principles[i]],
        "p_a_shown_first": p_first.tolist(), "p_a_shown_second": p_second.tolist(),
        "p_a": float(judgements.prob_a[i]), "margin": m,
        "label": "a" if m > 0 else "b" if m < 0 else "tie"})
  return rows


def pair_indices(k: int, pairs_per_prompt, rng: np.random.Generator) -> list[tuple[int, int]]:
  """Index pairs (i, j), i < j, of k responses: 'all', 'adjacent' or m drawn uniformly."""
  all_pairs = list(itertools.combinations(range(k), 2))
  if pairs_per_prompt == "all":
    return all_pairs
  if pairs_per_prompt == "adjacent":
    return [(i, i + 1) for i in range(k - 1)]
  chosen = np.sort(rng.choice(len(all_pairs), size=int(pairs_per_prompt), replace=False))
  return [all_pairs[c] for c in chosen]


def write_dataset(out_dir: str, name: str, records: Mapping[str, list],
                  rows: Mapping[str, list], metadata: dict, with_scores: bool) -> str:
  """Prepares the preference dataset (every stage reads it unchanged) and writes the
  per-pair judgements beside its files as `judgements-<split>.jsonl`; returns its dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  dataset_dir = tfds_builders.prepare(
      "preference", name, {s: (lambda r=r: r) for s, r in records.items()}, data_dir=out_dir,
      metadata=dict(metadata, margin=MARGIN_KIND), with_scores=with_scores)
  for split, split_rows in rows.items():
    with open(os.path.join(dataset_dir, f"judgements-{split}.jsonl"), "w") as f:
      for row in split_rows:
        f.write(json.dumps(row) + "\n")
  return dataset_dir



def label_responses(lm: models.LanguageModel, constitution: constitution_lib.Constitution,
                    fmt: constitution_lib.PromptFormat, prompts: Sequence[str],
                    responses: Sequence[Sequence[str]], *, scores=None,
                    pairs_per_prompt="all", principles: str = "sample", seed: int = 0,
                    batch_size: int = 16, bucket: int = 32,
                    progress_every_s: float | None = None) -> tuple[list, list, dict]:
  """Judges pairs of the k responses to each prompt: (records, judgement rows, stats).

  responses: [num_prompts][k]; scores: optional [num_prompts, k] gold scores (kept in
  the records, agreement reported overall and per principle). Pairs per prompt as
  `pair_indices` (drawn from `default_rng([seed, 1])`), principles as
  `constitution.choose_principles(mode=principles, seed=seed)`. `progress_every_s`:
  print a progress line that often (None: never).
  """
  k = len(responses[0]) if len(responses) else 0
  if k < 2 or any(len(r) != k for r in responses) or len(responses) != len(prompts):
    raise ValueError(f"label_responses: need {len(prompts)} lists of k >= 2 responses each")
  rng = np.random.default_rng([seed, 1])
  pair_prompts, a, b, score_a, score_b = [], [], [], [], []
  for p, prompt in enumerate(prompts):
    for i, j in pair_indices(k, pairs_per_prompt, rng):
      pair_prompts.append(prompt)
      a.append(responses[p][i])
      b.append(responses[p][j])
      if scores is not None:
        score_a.append(float(scores[p][i]))
        score_b.append(float(scores[p][j]))
  chosen = constitution_lib.choose_principles(constitution, len(a), principles, seed)
  progress = (models.Progress("judge", len(a), "pairs", progress_every_s)
              if progress_every_s is not None else None)
  judgements = judge_pairs(lm, constitution, fmt, pair_prompts, a, b, chosen,
                           batch_size=batch_size, bucket=bucket, progress=progress)
  with_scores = scores is not None
  records, stats = preference_records(pair_prompts, a, b, judgements,
                                      score_a if with_scores else None,
                                      score_b if with_scores else None)
  names = [p.name for p in constitution.principles]
  if with_scores and principles != "all":
    stats["principle_agreement"] = principle_agreement(judgements, names, score_a, score_b)
  return records, judgement_rows(pair_prompts, a, b, judgements, names), stats
