"""A tiny preference file for stage tests: positive reviews preferred to negative ones."""

import json

from configs import base

POSITIVE = ["a great film.", "truly wonderful acting.", "I loved it!", "a charming story."]
NEGATIVE = ["a dull film.", "truly awful acting.", "I hated it.", "a boring mess."]


def write_pairs(path, n=48):
  with open(path, "w") as f:
    for i in range(n):
      prompt = f"Review {i % 7}: the movie was"
      f.write(json.dumps({"prompt": prompt, "chosen": " " + POSITIVE[i % 4],
                          "rejected": " " + NEGATIVE[(i + 1) % 4]}) + "\n")
  return str(path)


def pair_config(module, tmp_path, **train):
  c = module.get_config()
  c.model = base.model_config("tiny")
  c.data.update(source="jsonl", train_file=write_pairs(tmp_path / "pairs.jsonl"), seq_len=48,
                batch_size=8, eval_batch_size=8, on_error="raise", data_dir=str(tmp_path / "data"))
  c.train.update(num_steps=4, log_every=1, eval_every=0, checkpoint_every=0, eval_batches=0)
  c.train.update(**train)
  c.optimizer.warmup_steps = 1
  if "preference" in c:
    c.sampling.eval_prompts = 0    # sampling at eval: tested once, in test_dpo
  return c
