"""A policy on the sentiment testbed: load it, sample from it, score it.

Shared by `experiments.label_preferences`, `experiments.evaluate_policy` and the PPO /
DPO stages' evaluation. A policy is a `Policy(model, params)`; `as_policy` also takes
a run's workdir (its config.json and latest checkpoint).

The gold reward of a response is VADER on the whole review, prompt + response
(`gold_scores`), so a policy's gold mean compares with the corpus's (~0.04).
"""

import functools
import json
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import tokenizers
from rlhf_jax.data import collate
from rlhf_jax.data import sources
from rlhf_jax.data import tfds_builders
from rlhf_jax.model import sampling
from rlhf_jax.objectives import sft as sft_objective
from rlhf_jax.stages import common
from rlhf_jax.testbed import evaluation
from rlhf_jax.testbed import gold_reward
from rlhf_jax.train import checkpoint as checkpoint_lib
from rlhf_jax.train import sharding as sharding_lib

# Used when a run's config.json predates `config.sampling` (configs/base.py).
DEFAULT_SAMPLING = dict(max_new_tokens=48, temperature=1.0, top_k=0, top_p=1.0,
                        eval_prompts=256, eval_batch_size=64)


class Policy(NamedTuple):
  model: Any    # a `Transformer` with the 'lm' head
  params: Any   # its (unboxed) params


def read_config(path: str) -> ml_collections.ConfigDict:
  """The config.json of the run in workdir `path`."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"policy {path!r} does not exist (expected a run's workdir)")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"policy {path!r} is not a directory (expected a run's workdir)")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"policy {path!r} has no config.json (expected a run's workdir)")
  with open(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


def sampling_options(config: ml_collections.ConfigDict) -> dict:
  """config.sampling as a dict, with defaults for fields a run's config lacks."""
  found = config.get("sampling")
  found = found.to_dict() if found is not None else {}
  return {k: found.get(k, v) for k, v in DEFAULT_SAMPLING.items()}


def make_tokenizer(config: ml_collections.ConfigDict) -> tokenizers.Tokenizer:
  """The tokenizer of a run's config."""
  return tokenizers.make_tokenizer(config.tokenizer)


def load_policy(path: str, mesh=None, heads=("lm",)):
  """Rebuilds the model of workdir `path` and loads its latest checkpoint's params.

  Args:
    path: a run's workdir (config.json and checkpoints/); the params are the
      checkpoint's `params`, or its `params['policy']` (PPO).
    mesh: params are sharded on it by `config.sharding.rules`; None: the first device.
    heads: model heads; heads the checkpoint lacks keep a fresh initialisation.
  Returns:
    (config, model, params). FileNotFoundError (naming `path`) when the workdir, its
    config.json or a complete checkpoint is missing.
  """
  config = read_config(path)
  checkpoint_lib.checkpoint_dir(path)    # fails early, naming `path`, before any tracing
  model = common.make_model(config, heads)
  if mesh is None:
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                                  jax.devices()[:1])
  tokens = jnp.zeros((1, 8), jnp.int32)
  init_fn = lambda r: model.init(r, tokens, tokens, jnp.ones_like(tokens))["params"]
  params, _ = sharding_lib.init_sharded(init_fn, jax.random.key(0), mesh,
                                        sharding_lib.rules(config))
  try:
    return config, model, checkpoint_lib.load_params(path, params)
  except ValueError as e:
    if "shares no parameter" not in str(e):
      raise
  # A PPO run keeps the policy under params['policy'], beside the critic.
  return config, model, checkpoint_lib.load_params(path, {"policy": params})["policy"]


def as_policy(policy, mesh=None) -> Policy:
  """A Policy, a (model, params) pair, or a workdir path -> Policy."""
  if isinstance(policy, (str, os.PathLike)):
    _, model, params = load_policy(os.fspath(policy), mesh)
    return Policy(model, params)
  model, params = policy
  return Policy(model, params)


def heldout_prompts(config: ml_collections.ConfigDict, data_dir: str, split: str = "test",
                    num: int | None = None, start: int = 0) -> list[str]:
  """Prompts `[start, start + num)` of a split of `sources.prompts(config.data)`.

  For the testbed, split 'test' holds prefixes of held-out reviews.
  """
  dataset_dir, _ = sources.prompts(config.data, data_dir)
  splits = tfds_builders.load(dataset_dir, kind="prompt")
  if split not in splits:
    raise ValueError(f"prompt dataset {dataset_dir} has no split {split!r} "
                     f"(has {sorted(splits)})")
  source = splits[split]
  stop = len(source) if num is None else start + num
  if num is not None and num < 1:
    raise ValueError(f"number of prompts must be >= 1, got {num}")
  if stop > len(source):
    raise ValueError(f"prompt split {split!r} of {dataset_dir} has {len(source)} prompts, "
                     f"asked for [{start}, {stop})")
  return [r["prompt"] for r in source.__getitems__(range(start, stop))]


def gold_scores(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
  """Gold reward `[N]` float32 of each whole review, prompt + response."""
  if len(prompts) != len(responses):
    raise ValueError(f"gold_scores: {len(prompts)} prompts, {len(responses)} responses")
  return gold_reward.gold_reward([p + r for p, r in zip(prompts, responses)])


def tokenize_prompts(prompts: Sequence[str], tokenizer, prompt_len: int) -> dict[str, np.ndarray]:
  """-> prompt_tokens, prompt_mask `[N, prompt_len]` int32, left-padded `pad... BOS prompt`."""
  if isinstance(prompts, str):
    raise ValueError("prompts must be a list of strings, got a single string")
  examples = [collate.prompt_example(tokenizer, p, prompt_len) for p in prompts]
  return {k: np.stack([e[k] for e in examples]).astype(np.int32)
          for k in ("prompt_tokens", "prompt_mask")}


def generate(model, params, prompts: Sequence[str], tokenizer, rng: jax.Array, *,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False, batch_size: int,
             prompt_len: int) -> dict:
  """Samples one response per prompt, `batch_size` prompts per `sampling.sample` call.

  Batch `i` samples with `fold_in(rng, i)`, so the samples are a function of (rng,
  prompts, batch_size): another batch_size gives other (equally distributed) samples.
  Greedy decoding does not depend on either. The last batch is padded with copies of
  its last prompt, whose rows are dropped.

  Returns (numpy, N = len(prompts)):
    texts: [N] decoded responses (without prompt, EOS or pads).
    response_tokens, response_mask: [N, max_new_tokens] int32.
    logprobs: [N, max_new_tokens] float32, log_softmax(logits / temperature) of each
      sampled token (temperature 1 when greedy), 0 where masked.
    prompt_tokens, prompt_mask: [N, prompt_len] int32, left-padded.
  """
  if not prompts:
    raise ValueError("generate: no prompts")
  if batch_size < 1:
    raise ValueError(f"generate: batch_size must be >= 1, got {batch_size}")
  inputs = tokenize_prompts(prompts, tokenizer, prompt_len)
  n = len(prompts)
  options = dict(max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                 top_k=int(top_k), top_p=float(top_p), greedy=bool(greedy),
                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  outputs = {"response_tokens": [], "response_mask": [], "logprobs": []}
  for i, start in enumerate(range(0, n, batch_size)):
    rows = np.minimum(np.arange(start, start + batch_size), n - 1)
    out = sampling.sample(params, model, inputs["prompt_tokens"][rows],
                          inputs["prompt_mask"][rows], jax.random.fold_in(rng, i), **options)
    out = jax.device_get(out)
    real = min(batch_size, n - start)
    for k in outputs:
      outputs[k].append(np.asarray(getattr(out, k))[:real])
  outputs = {k: np.concatenate(v) for k, v in outputs.items()}
  outputs["response_tokens"] = outputs["response_tokens"].astype(np.int32)
  outputs["response_mask"] = outputs["response_mask"].astype(np.int32)
  outputs["logprobs"] = outputs["logprobs"].astype(np.float32)
  texts = [tokenizer.decode(t[m == 1])
           for t, m in zip(outputs["response_tokens"], outputs["response_mask"])]
  return dict(texts=texts, **outputs, **inputs)


@functools.partial(jax.jit, static_argnames=("model", "temperature"))
def _response_logprobs(params, model, prompt_tokens, prompt_mask, response_tokens,
                       response_mask, temperature):
  tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
  outputs, _ = model.apply({"params": params}, tokens, common.positions_from_mask(mask), mask)
  logits = outputs["logits"].astype(jnp.float32) / temperature
  logp = sft_objective.token_logprobs(logits, tokens)       # [B, P + N - 1], predicts t + 1
  p = prompt_tokens.shape[1]
  return jnp.where(response_mask == 1, logp[:, p - 1:], 0.0)


def sequence_logprobs_under(model, params, prompt_tokens, prompt_mask, response_tokens,
                            response_mask, temperature: float = 1.0,
                            batch_size: int | None = None) -> np.ndarray:
  """Per-token log-probs `[N, max_new]` float32 of given responses under (model, params).

  One forward pass over prompt (left-padded, `[N, P]`) + response (`[N, max_new]`),
  positions `cumsum(mask) - 1`, `log_softmax(logits / temperature)` at each response
  token; 0 where `response_mask` is 0. With the sampling policy's own params and
  temperature this equals `generate(...)['logprobs']`; with a reference policy's,
  their difference is the Monte-Carlo KL integrand.
  """
  arrays = [np.asarray(a, np.int32) for a in (prompt_tokens, prompt_mask, response_tokens,
                                              response_mask)]
  n = arrays[0].shape[0]
  if arrays[1].shape != arrays[0].shape or arrays[3].shape != arrays[2].shape or \
      arrays[2].shape[0] != n:
    raise ValueError("sequence_logprobs_under: prompt_tokens/prompt_mask [N, P] and "
                     "response_tokens/response_mask [N, max_new] shapes disagree: "
                     f"{[a.shape for a in arrays]}")
  if not temperature > 0:
    raise ValueError(f"sequence_logprobs_under: temperature must be > 0, got {temperature}")
  batch_size = batch_size or n
  chunks = []
  for start in range(0, n, batch_size):
    chunks.append(np.asarray(jax.device_get(_response_logprobs(
        params, model, *(a[start:start + batch_size] for a in arrays),
        temperature=float(temperature)))))
  return np.concatenate(chunks).astype(np.float32)


def evaluate_policy(policy, reference, prompts: Sequence[str], tokenizer, rng: jax.Array, *,
                    max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, batch_size: int, prompt_len: int,
                    num_samples: int = 4, mesh=None, gold_fn=None,
                    extra_scores: Mapping[str, Callable] | None = None) -> dict:
  """Gold reward, KL to the reference, length and diversity of a policy's samples.

  Args:
    policy: a Policy / (model, params) pair (in-memory, e.g. a stage's state) or a
      workdir path.
    reference: the same, or None to skip the KL.
    prompts: `[N]` prompts; one response each.
    tokenizer, rng, sampling options: as `generate`.
    num_samples: (prompt, response, gold) examples kept, the first ones.
    mesh: for paths only (see `load_policy`).
    gold_fn: (prompts, responses) -> `[N]` gold scores; default `gold_scores` (VADER).
    extra_scores: {name: (prompts, responses) -> `[N]`}: more measures, each reported
      as `<name>_mean` and `<name>_stderr` (ddof=1) and kept in the samples.
  Returns:
    `evaluation.summarize_policy`'s dict: gold (of prompt + response) mean / std /
    stderr, response length in tokens, distinct-1/2 of the responses, `kl` and
    `kl_stderr`: the Monte-Carlo sequence KL(pi || pi_ref) with pi the distribution
    sampled (the policy at `temperature`) and pi_ref at temperature 1. The KL is None
    when no reference is given or top-k / top-p filtering makes the sampled
    distribution differ from the log-probs (`kl_note` says why). JSON-serialisable.
  """
  pol = as_policy(policy, mesh)
  options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, batch_size=batch_size, prompt_len=prompt_len)
  out = generate(pol.model, pol.params, prompts, tokenizer, rng, **options)
  gold = (gold_fn or gold_scores)(prompts, out["texts"])
  extra = {name: np.asarray(fn(prompts, out["texts"]), np.float64)
           for name, fn in (extra_scores or {}).items()}
  kl, note = None, None
  if reference is None:
    note = "no reference"
  elif top_k or top_p < 1.0:
    note = "top-k / top-p sampling: the log-probs are not those of the sampled distribution"
  else:
    ref = as_policy(reference, mesh)
    ref_logprobs = sequence_logprobs_under(ref.model, ref.params, out["prompt_tokens"],
                                           out["prompt_mask"], out["response_tokens"],
                                           out["response_mask"], batch_size=batch_size)
    kl = evaluation.sequence_kl_estimate(out["logprobs"], ref_logprobs, out["response_mask"])
  summary = evaluation.summarize_policy(out["texts"], gold, out["response_mask"].sum(axis=1),
                                        kl=kl, num_samples=0)
  summary["samples"] = [{"prompt": p, "response": r, "gold": float(g)}
                        for p, r, g in zip(prompts[:num_samples], out["texts"], gold)]
  for name, values in extra.items():
    summary[f"{name}_mean"] = float(values.mean())
    summary[f"{name}_stderr"] = (float(values.std(ddof=1) / np.sqrt(len(values)))
                                 if len(values) > 1 else None)
    for sample, value in zip(summary["samples"], values):
      sample[name] = float(value)
  summary["sampling"] = dict(options)
  if note:
    summary["kl_note"] = note
  return summary

