r"""Throughput of the fixed `bench` model: train steps, sampler, PPO; MFU against a measured peak.

  python -m benchmarks.run [--config=benchmarks/run.py] [--config.bench.batch_size=8] \
      [--out=benchmarks/results]

Every figure is measured by this run on this machine:
  matmul      the peak: best time of a float32 `jnp.dot` of two [n, n] matrices, 2 n^3 FLOPs
  sft, reward, dpo
              one jitted, state-donating train step (as rlhf_jax/train/loop.py runs it) on a
              synthetic random batch; after `warmup` calls, `steps` calls each timed to
              `block_until_ready`; the median is reported
  sft fwd / fwd+bwd
              the SFT loss alone and its gradient, to split a step's time (profile)
  prefill, decode
              a prefill-only call (the prompt into the KV cache) and a full generation
              (`sampling.sample`, EOS off so every row decodes `new_tokens`); decode time
              is the difference
  ppo         one full iteration of rlhf_jax.stages.ppo (rollout, advantages, updates),
              when that stage exists
Model FLOPs use `transformer.flops_per_token` (6N + 12 L H Dh T per trained token; a
forward pass is a third of it); MFU = achieved model FLOP/s / matmul peak. XLA's own
count of the compiled step (`cost_analysis`) is reported beside it. Peak memory is the
device's `memory_stats()` where it has them, else the process's max RSS.

Writes results.json and results.md to --out and prints the table.
"""

import datetime
import json
import os
import platform
import resource
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from configs import base
from configs import dpo as dpo_config
from configs import reward as reward_config
from rlhf_jax.model import sampling
from rlhf_jax.model import transformer
from rlhf_jax.objectives import sft as sft_objective
from rlhf_jax.stages import common
from rlhf_jax.stages import dpo
from rlhf_jax.stages import reward
from rlhf_jax.stages import sft
from rlhf_jax.train import loop
from rlhf_jax.train import sharding as sharding_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config() -> ml_collections.ConfigDict:
  """The benchmark: configs/base.py with the `bench` model; sizes under `bench`."""
  c = base.get_config()
  c.model = base.model_config("bench")
  c.train.num_steps = 1000                 # only shapes the learning-rate schedule
  c.optimizer.warmup_steps = 0
  c.preference = dpo_config.get_config().preference
  c.reward_model = reward_config.get_config().reward_model
  b = c.bench = ml_collections.ConfigDict()
  b.batch_size = 4          # sequences per train step (reward, DPO: batch_size // 2 pairs)
  b.seq_len = 128           # tokens per sequence
  b.warmup = 1              # untimed calls after compilation
  b.steps = 5               # timed calls
  b.matmul_size = 2048      # n of the [n, n] @ [n, n] peak
  b.sample_batch = 4        # prompts per sampler call
  b.prompt_len = 32
  b.new_tokens = 32
  b.ppo_prompts = 4         # prompts per PPO iteration (ppo: epochs 1, 2 minibatches)
  b.only = ""               # comma-separated subset of: matmul,sft,profile,reward,dpo,sampler,ppo
  return c


SECTIONS = ("matmul", "sft", "profile", "reward", "dpo", "sampler", "ppo")


# ---------------------------------------------------------------- measuring

def timed(fn, warmup: int, steps: int) -> list[float]:
  """Seconds of `steps` calls of fn() after `warmup` calls; fn blocks until ready."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def peak_memory() -> dict:
  """Device peak bytes when the backend reports them, else this process's max RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return {"peak_memory_mb": stats["peak_bytes_in_use"] / 2**20, "memory_source": "device"}
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
  return {"peak_memory_mb": rss_kb / 1024, "memory_source": "max RSS (process)"}


def xla_costs(compiled) -> dict:
  """FLOPs and per-device memory XLA assigns to a compiled program."""
  out = {}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and "flops" in cost:
    out["xla_flops"] = float(cost["flops"])
  memory = compiled.memory_analysis()
  if memory is not None:
    out["xla_args_mb"] = memory.argument_size_in_bytes / 2**20
    out["xla_temp_mb"] = memory.temp_size_in_bytes / 2**20
  return out


def summarise(name: str, times: list[float], tokens: int, model_flops: float, **extra) -> dict:
  """A row: median seconds (and the fastest), tokens/s, model FLOP/s; MFU is added by `run`."""
  seconds = statistics.median(times)
  row = {"name": name, "seconds": seconds, "seconds_min": min(times), "seconds_all": times,
         "tokens": tokens, "tokens_per_second": tokens / seconds, "model_flops": model_flops,
         "model_flops_per_second": model_flops / seconds}
  row.update(extra)
  if "xla_flops" in row:
    row["xla_flops_per_second"] = row["xla_flops"] / seconds
  row.update(peak_memory())
  logging.warning("%s: %.3fs, %.0f tokens/s", name, seconds, tokens / seconds)
  return row


# ---------------------------------------------------------------- sections

def bench_matmul(n: int, warmup: int, steps: int) -> dict:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot).lower(a, b).compile()
  times = timed(lambda: dot(a, b).block_until_ready(), warmup + 1, steps)
  flops = 2.0 * n ** 3
  return {"name": f"matmul f32 {n}^3", "seconds": min(times), "seconds_min": min(times),
          "seconds_all": times, "model_flops": flops, "model_flops_per_second": flops / min(times)}


def lm_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> dict:
  """Full-length random sequences; every token after the first four is a target."""
  tokens = rng.integers(3, vocab, (batch, seq)).astype(np.int32)
  mask = np.ones((batch, seq), np.int32)
  loss_mask = mask * (np.arange(seq) >= 4)
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask.astype(np.int32)}


def preference_batch(rng: np.random.Generator, pairs: int, seq: int, vocab: int) -> dict:
  out = {}
  for side in ("chosen", "rejected"):
    out.update({f"{side}_{k}": v for k, v in lm_batch(rng, pairs, seq, vocab).items()})
  out["margin"] = np.zeros((pairs,), np.float32)
  return out


def bench_train_step(name, stage, config, host_batch, tokens, model_flops, bc) -> dict:
  """The loop's jitted, donating step of `stage` on a fixed batch; `bc`: config.bench."""
  mesh = sharding_lib.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    state = stage.init(config, jax.random.key(0), mesh)
    step = loop.jit_step(stage, config, state, mesh)
    batch = sharding_lib.put_batch(host_batch, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
    compile_seconds = time.perf_counter() - start
    holder = [state]

    def run():
      holder[0], metrics = compiled(holder[0], batch, jax.random.key(1))
      jax.block_until_ready((holder[0], metrics))

    times = timed(run, bc.warmup, bc.steps)
  return summarise(name, times, tokens, model_flops, compile_seconds=compile_seconds,
                   **xla_costs(compiled))


def bench_sft_parts(config, host_batch, tokens, flops_per_token) -> list[dict]:
  """Forward (loss) and forward + backward (gradient) of the SFT step, to split its time."""
  bc = config.bench
  model = common.make_model(config)
  mesh = sharding_lib.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    params = sft.init(config, jax.random.key(0), mesh).params
    batch = sharding_lib.put_batch(host_batch, mesh)

    def loss(p):
      return sft_objective.sft_loss(sft.logits_fn(model, p, batch), batch["tokens"],
                                    batch["loss_mask"])[0]

    rows = []
    for name, fn, flops in (("sft fwd (loss)", loss, flops_per_token / 3),
                            ("sft fwd+bwd (grad)", jax.grad(loss), flops_per_token)):
      compiled = jax.jit(fn).lower(params).compile()
      times = timed(lambda: jax.block_until_ready(compiled(params)), bc.warmup, bc.steps)
      rows.append(summarise(name, times, tokens, flops * tokens, **xla_costs(compiled)))
  return rows


def bench_sampler(config) -> list[dict]:
  """Prefill-only call vs full generation of `new_tokens` (EOS off): prefill and decode rates."""
  bc = config.bench
  model = common.make_model(config)
  mc = model.config
  b, p, n = bc.sample_batch, bc.prompt_len, bc.new_tokens
  rng = np.random.default_rng(1)
  prompt = jnp.asarray(rng.integers(3, mc.vocab_size, (b, p)), jnp.int32)
  prompt_mask = jnp.ones((b, p), jnp.int32)
  params = jax.jit(lambda r: model.init(r, prompt, prompt, prompt_mask)["params"])(
      jax.random.key(0))
  params = nn.meta.unbox(params)

  @jax.jit
  def prefill(params, tokens, mask):
    key_mask = jnp.concatenate([mask, jnp.ones((b, n), jnp.int32)], axis=1)
    cache = transformer.init_cache(mc, b, p + n)
    outputs, cache = model.apply({"params": params}, tokens, sampling.prompt_positions(mask),
                                 key_mask, cache)
    return outputs["logits"][:, -1], cache

  def generate():
    return sampling.sample(params, model, prompt, prompt_mask, jax.random.key(2),
                           max_new_tokens=n, temperature=1.0, eos_id=-1, pad_id=0)

  prefill_times = timed(lambda: jax.block_until_ready(prefill(params, prompt, prompt_mask)),
                        bc.warmup + 1, bc.steps)
  full_times = timed(lambda: jax.block_until_ready(generate()), bc.warmup + 1, bc.steps)
  assert int(jnp.sum(generate().response_mask)) == b * n   # every row decoded n tokens
  t_prefill, t_full = statistics.median(prefill_times), statistics.median(full_times)
  forward_flops = lambda context: transformer.flops_per_token(mc, context) / 3
  prefill_row = summarise("prefill", prefill_times, b * p, b * p * forward_flops(p))
  decode_seconds = t_full - t_prefill
  decode_flops = b * sum(forward_flops(p + i) for i in range(n))
  decode_row = {"name": "decode", "seconds": decode_seconds, "tokens": b * n,
                "tokens_per_second": b * n / decode_seconds, "model_flops": decode_flops,
                "model_flops_per_second": decode_flops / decode_seconds,
                "seconds_per_token": decode_seconds / n, "full_generation_seconds": t_full,
                **peak_memory()}
  logging.warning("decode: %.3fs, %.0f tokens/s", decode_seconds, b * n / decode_seconds)
  return [prefill_row, decode_row]


def bench_ppo(config) -> dict:
  """One full RLHF iteration of rlhf_jax.stages.ppo, when another engineer's stage exists."""
  try:
    from configs import ppo as ppo_config
    from rlhf_jax.stages import ppo
    import rlhf_jax.testbed  # noqa: F401  (registers the "gold" reward used below)
  except ImportError as e:
    return {"name": "ppo iteration", "skipped": f"rlhf_jax.stages.ppo not importable: {e}"}
  bc = config.bench
  c = ppo_config.get_config()
  c.model, c.mesh, c.sharding = config.model, config.mesh, config.sharding
  c.data.prompt_len, c.data.batch_size = bc.prompt_len, bc.ppo_prompts
  c.train.num_steps = 1000
  c.rl.update(reward="gold", reward_checkpoint="", critic="separate", algorithm="ppo",
              epochs=1, num_minibatches=2)
  c.sampling.max_new_tokens = bc.new_tokens
  rng = np.random.default_rng(3)
  prompts = rng.integers(3, c.model.vocab_size, (bc.ppo_prompts, bc.prompt_len)).astype(np.int32)
  host_batch = {"prompt_tokens": prompts,
                "prompt_mask": np.ones((bc.ppo_prompts, bc.prompt_len), np.int32)}
  mc = transformer.TransformerConfig.from_dict(c.model)
  b, p, n = bc.ppo_prompts, bc.prompt_len, bc.new_tokens
  fwd = lambda context: transformer.flops_per_token(mc, context) / 3
  # Rollout: sampling, then policy, reference and critic forward passes over P + N tokens;
  # updates: epochs x (policy + critic) forward and backward over P + N tokens.
  flops = (b * p * fwd(p) + b * sum(fwd(p + i) for i in range(n))
           + 3 * b * (p + n) * fwd(p + n)
           + c.rl.epochs * 2 * b * (p + n) * transformer.flops_per_token(mc, p + n))
  try:
    row = bench_train_step("ppo iteration", ppo, c, host_batch, b * n, flops, bc)
  except Exception as e:  # pylint: disable=broad-except  # another engineer's stage, in progress
    return {"name": "ppo iteration", "skipped": f"{type(e).__name__}: {e}"[:300]}
  row.update(tokens_note="generated tokens", reward="gold (VADER on the host)",
             ppo=f"{b} prompts x {n} new tokens, epochs 1, 2 minibatches, separate critic")
  return row


# ---------------------------------------------------------------- report

def run(config: ml_collections.ConfigDict) -> dict:
  bc = config.bench
  only = [s.strip() for s in bc.only.split(",") if s.strip()] or list(SECTIONS)
  unknown = set(only) - set(SECTIONS)
  if unknown:
    raise ValueError(f"config.bench.only: unknown sections {sorted(unknown)}; "
                     f"expected a subset of {SECTIONS}")
  mc = transformer.TransformerConfig.from_dict(config.model)
  if bc.seq_len > mc.max_len:
    raise ValueError(f"config.bench.seq_len={bc.seq_len} > config.model.max_len={mc.max_len}")
  if bc.batch_size < 2 or bc.batch_size % 2:
    raise ValueError(f"config.bench.batch_size must be even and >= 2, got {bc.batch_size}")
  config.data.seq_len = bc.seq_len
  b, t = bc.batch_size, bc.seq_len
  fpt = transformer.flops_per_token(mc, t)
  rng = np.random.default_rng(0)
  started = time.time()
  load_before = os.getloadavg()
  rows = []
  if "matmul" in only:
    rows.append(bench_matmul(bc.matmul_size, bc.warmup, bc.steps))
  lm = lm_batch(rng, b, t, mc.vocab_size)
  if "sft" in only:
    rows.append(bench_train_step("sft step", sft, config, lm, b * t, fpt * b * t, bc))
  if "profile" in only:
    rows.extend(bench_sft_parts(config, lm, b * t, fpt))
  pairs = preference_batch(rng, b // 2, t, mc.vocab_size)
  if "reward" in only:
    # The scalar head replaces the LM head's matmul: 6 V D fewer FLOPs a token.
    rm_fpt = fpt - 6 * mc.vocab_size * mc.embed_dim
    rows.append(bench_train_step("reward step", reward, config, pairs, b * t, rm_fpt * b * t, bc))
  if "dpo" in only:
    # The policy trains on chosen and rejected; the frozen reference runs forward only.
    rows.append(bench_train_step("dpo step", dpo, config, pairs, b * t, fpt * b * t * 4 / 3, bc))
  if "sampler" in only:
    rows.extend(bench_sampler(config))
  if "ppo" in only:
    rows.append(bench_ppo(config))
  peak = None
  if "matmul" in only:
    # Measured again at the end: other processes' load changes during the run, and the
    # peak is the best the machine gave during the run.
    rows.append(dict(bench_matmul(bc.matmul_size, bc.warmup, bc.steps), name=rows[0]["name"]
                     + " (again, at the end)"))
    peak = max(r["model_flops_per_second"] for r in rows if r["name"].startswith("matmul"))
    for r in rows:
      if "skipped" not in r and not r["name"].startswith("matmul"):
        r["mfu"] = r["model_flops_per_second"] / peak
        r["mfu_fastest"] = r["model_flops"] / r.get("seconds_min", r["seconds"]) / peak
    logging.warning("matmul peak %.1f GFLOP/s", peak / 1e9)
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "backend": jax.default_backend(),
                  "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
      "model": config.model.to_dict(), "bench": bc.to_dict(),
      "num_params": transformer.num_params(mc), "flops_per_token": fpt,
      "matmul_peak_flops_per_second": peak, "wall_seconds": time.time() - started,
      "results": rows,
  }


def markdown(report: dict) -> str:
  bc, m = report["bench"], report["machine"]
  peak = report["matmul_peak_flops_per_second"]
  lines = [
      f"# rlhf_jax benchmark ({report['date']})", "",
      f"{m['backend']} x {len(m['devices'])}, {m['cpu_count']} CPUs, jax {m['jax']}; load "
      f"average {m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after "
      f"(other processes share the machine: figures are pessimistic).", "",
      f"Model `bench`: {report['num_params'] / 1e6:.2f}M params, {report['flops_per_token'] / 1e6:.1f} "
      f"MFLOP per trained token at seq {bc['seq_len']}; train batch {bc['batch_size']} x "
      f"{bc['seq_len']}; sampler {bc['sample_batch']} x ({bc['prompt_len']} + "
      f"{bc['new_tokens']}). Matmul peak: "
      + (f"{peak / 1e9:.1f} GFLOP/s." if peak else "not measured."), "",
      "| benchmark | time (s) | tokens/s | model GFLOP/s | MFU | MFU (fastest call) | XLA GFLOP/s | XLA temp MB | peak mem MB |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  for r in report["results"]:
    if "skipped" in r:
      lines.append(f"| {r['name']} | skipped: {r['skipped']} | | | | | | | |")
      continue
    lines.append(
        f"| {r['name']} | {r['seconds']:.3f} | {fmt(r.get('tokens_per_second'), ',.0f')} | "
        f"{r['model_flops_per_second'] / 1e9:.2f} | "
        f"{fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}{'%' if r.get('mfu') else ''} | "
        f"{fmt(r.get('mfu_fastest') and 100 * r['mfu_fastest'], '.1f')}"
        f"{'%' if r.get('mfu_fastest') else ''} | "
        f"{fmt(r.get('xla_flops_per_second') and r['xla_flops_per_second'] / 1e9, '.2f')} | "
        f"{fmt(r.get('xla_temp_mb'), '.1f')} | {fmt(r.get('peak_memory_mb'), '.0f')} |")
  lines += ["", "Times are medians of the timed calls. MFU: model FLOPs (6N + 12 L H Dh T a "
            "trained token, a third of it a forward token) per second over the matmul peak "
            "(the best of the matmul runs at the start and the end). Decode time = full "
            "generation - prefill. PPO tokens/s counts generated tokens."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value or get_config()
  out = _OUT.value or os.path.join(ROOT, "benchmarks", "results")
  report = run(config)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(report, f, indent=1, default=str)
  table = markdown(report)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  # Defined here, not at import: `--config=benchmarks/run.py` loads this file again.
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Benchmark config; default: get_config().")
  _OUT = flags.DEFINE_string("out", "", "Output directory; default benchmarks/results.")
  app.run(main)
