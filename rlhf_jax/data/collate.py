"""Tokenize and lay out one example as in ARCHITECTURE.md (pure NumPy, int32).

LM example (right-padded, `[T]`): `BOS prompt response EOS pad...`; `mask` is 1 on real
tokens, `loss_mask` is 1 on response tokens and the EOS (for pretraining text: on every
real token after BOS). A too-long prompt is cut from the left, keeping BOS; an example
whose response alone does not fit returns None, for the caller to count.

Prompt example (left-padded, `[P]`): `pad... BOS prompt`, the prompt cut from the left.
"""

from typing import Any, Callable

import numpy as np

from rlhf_jax.tokenizers import Tokenizer


def _layout(ids: list[int], loss_start: int, pad_id: int,
            seq_len: int) -> dict[str, np.ndarray]:
  """Right-pads `ids` to `[seq_len]`; loss on ids[loss_start:]."""
  n = len(ids)
  tokens = np.full([seq_len], pad_id, np.int32)
  tokens[:n] = ids
  mask = np.zeros([seq_len], np.int32)
  mask[:n] = 1
  loss_mask = np.zeros([seq_len], np.int32)
  loss_mask[loss_start:n] = 1
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def _cut_left(ids: list[int], room: int) -> list[int]:
  return ids[len(ids) - room:] if len(ids) > room else ids


def lm_example(tokenizer: Tokenizer, prompt: str, response: str,
               seq_len: int) -> dict[str, np.ndarray] | None:
  """-> {tokens, mask, loss_mask} `[seq_len]`, loss on response + EOS; None if it cannot fit."""
  prompt_ids, response_ids = tokenizer.encode(prompt), tokenizer.encode(response)
  room = seq_len - 2 - len(response_ids)  # prompt tokens that fit beside BOS, EOS
  if room < 0:
    return None
  prompt_ids = [tokenizer.bos_id, *_cut_left(prompt_ids, room)]
  return _layout([*prompt_ids, *response_ids, tokenizer.eos_id], len(prompt_ids),
                 tokenizer.pad_id, seq_len)


def text_example(tokenizer: Tokenizer, text: str, seq_len: int) -> dict[str, np.ndarray]:
  """Pretraining text -> {tokens, mask, loss_mask} `[seq_len]`, loss on all tokens after BOS.

  Text longer than `seq_len - 2` tokens keeps its beginning (and loses the EOS).
  """
  ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id][:seq_len]
  return _layout(ids, 1, tokenizer.pad_id, seq_len)


def preference_example(tokenizer: Tokenizer, prompt: str, chosen: str, rejected: str,
                       seq_len: int, margin: float = 0.0) -> dict[str, np.ndarray] | None:
  """-> chosen_{tokens,mask,loss_mask}, rejected_{...} `[seq_len]`, margin `[]` float32.

  Both sequences keep the same prompt tokens (cut from the left as much as the longer
  response needs), so the two responses are compared in the same context. None if
  either response alone does not fit.
  """
  prompt_ids = tokenizer.encode(prompt)
  responses = tokenizer.encode(chosen), tokenizer.encode(rejected)
  room = seq_len - 2 - max(len(r) for r in responses)
  if room < 0:
    return None
  prompt_ids = [tokenizer.bos_id, *_cut_left(prompt_ids, room)]
  out = {}
  for name, response_ids in zip(("chosen", "rejected"), responses):
    example = _layout([*prompt_ids, *response_ids, tokenizer.eos_id], len(prompt_ids),
                      tokenizer.pad_id, seq_len)
    out.update({f"{name}_{k}": v for k, v in example.items()})
  out["margin"] = np.asarray(margin, np.float32)
  return out


def prompt_example(tokenizer: Tokenizer, prompt: str, prompt_len: int) -> dict[str, np.ndarray]:
  """-> {prompt_tokens, prompt_mask} `[prompt_len]`, left-padded `pad... BOS prompt`."""
  if prompt_len < 1:
    raise ValueError(f"prompt_len must be >= 1, got {prompt_len}")
  ids = [tokenizer.bos_id, *_cut_left(tokenizer.encode(prompt), prompt_len - 1)]
  tokens = np.full([prompt_len], tokenizer.pad_id, np.int32)
  tokens[prompt_len - len(ids):] = ids
  mask = np.zeros([prompt_len], np.int32)
  mask[prompt_len - len(ids):] = 1
  return {"prompt_tokens": tokens, "prompt_mask": mask}


def make_transform(kind: str, tokenizer: Tokenizer, *, seq_len: int | None = None,
                   prompt_len: int | None = None) -> Callable[[dict], dict[str, Any] | None]:
  """Record -> example (or None) function for a dataset kind of `tfds_builders.KINDS`.

  'text' -> text_example, 'demonstration' -> lm_example, 'preference' ->
  preference_example, 'prompt' -> prompt_example (needs `prompt_len`).
  """
  if kind == "prompt":
    if not prompt_len:
      raise ValueError("make_transform('prompt'): prompt_len is required")
    return lambda r: prompt_example(tokenizer, r["prompt"], prompt_len)
  if not seq_len:
    raise ValueError(f"make_transform({kind!r}): seq_len is required")
  if kind == "text":
    return lambda r: text_example(tokenizer, r["text"], seq_len)
  if kind == "demonstration":
    return lambda r: lm_example(tokenizer, r["prompt"], r["response"], seq_len)
  if kind == "preference":
    return lambda r: preference_example(tokenizer, r["prompt"], r["chosen"], r["rejected"],
                                        seq_len, float(r.get("margin", 0.0)))
  raise ValueError(f"make_transform: unknown kind {kind!r}")
