"""rlhf_jax.testbed.seeds: layout, mean ± s.d. of hand-made results.json files, errors."""

import json
import os

import ml_collections
import pytest

from rlhf_jax.testbed import seeds

# Three seeds' hand-made tables: gold means 0.1/0.2/0.6 (mean 0.3, s.d. 0.264575...).
GOLD = {0: 0.1, 1: 0.2, 2: 0.6}


def _results(seed):
  return {"sft": {"gold_mean": GOLD[seed] - 0.1, "kl": 0.0, "length_mean": 10.0 + seed},
          "ppo": {"gold_mean": GOLD[seed], "kl": 1.0 + seed, "length_mean": 12.0},
          "best_of_4": {"gold_mean": 0.5, "kl": 0.84, "length_mean": 11.0, "proxy_reward": 3.0},
          "pretrained": {"gold_mean": 0.0, "kl": None, "length_mean": 9.0}}


def _write(workdir, seed):
  os.makedirs(os.path.join(workdir, "reward"), exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(_results(seed), f)
  with open(os.path.join(workdir, "reward", "gold_correlation.json"), "w") as f:
    json.dump({"pearson": 0.4 + 0.1 * seed, "spearman": 0.3, "samples": 64,
               "heldout_pairs": {"accuracy": 0.5 + 0.01 * seed, "gold_agreement_clear": 0.9}}, f)


def test_parse_seeds():
  assert seeds.parse_seeds("0,1,2") == [0, 1, 2] and seeds.parse_seeds("3") == [3]
  for bad in ("", "0,0", "-1", "a,b"):
    with pytest.raises(ValueError, match="--seeds"):
      seeds.parse_seeds(bad)


def test_run_seeds_layout_config_and_table(tmp_path):
  calls = []

  def fake_run(config, workdir):
    calls.append((config.seed, config.quick, workdir))
    _write(workdir, config.seed)

  config = ml_collections.ConfigDict({"seed": 0, "quick": True})
  config.lock()
  root = str(tmp_path)
  summary = seeds.run_seeds(config, root, [0, 1, 2], fake_run)
  assert calls == [(0, True, root), (1, True, f"{root}/seed_1"), (2, True, f"{root}/seed_2")]
  assert config.seed == 0                                   # the caller's config is untouched
  ppo = summary["policies"]["ppo"]
  assert ppo["gold_mean"]["values"] == [0.1, 0.2, 0.6]
  assert ppo["gold_mean"]["mean"] == pytest.approx(0.3)
  # Sample s.d. by hand: deviations -0.2, -0.1, 0.3 -> sqrt((0.04 + 0.01 + 0.09) / 2).
  assert ppo["gold_mean"]["sd"] == pytest.approx((0.14 / 2) ** 0.5)
  assert ppo["kl"]["mean"] == pytest.approx(2.0) and ppo["kl"]["sd"] == pytest.approx(1.0)
  assert summary["policies"]["best_of_4"]["kl"]["sd"] == 0.0
  assert summary["policies"]["pretrained"]["kl"] == {"mean": None, "sd": None,
                                                     "values": [None, None, None]}
  assert summary["reward_model"]["pearson"]["mean"] == pytest.approx(0.5)
  assert summary["reward_model"]["accuracy"]["sd"] == pytest.approx(0.01)
  with open(tmp_path / "results_seeds.json") as f:
    assert json.load(f) == summary
  table = (tmp_path / "results_seeds.md").read_text().splitlines()
  assert table[0].startswith("| policy | gold reward (mean ± s.d., 3 seeds) |")
  # POLICIES order first, then the rest sorted; KL '—' where a seed has none.
  assert [row.split(" | ")[0] for row in table[2:6]] == [
      "| pretrained", "| sft", "| ppo", "| best_of_4"]
  assert table[4] == "| ppo | 0.300 ± 0.265 | 2.00 ± 1.00 | 12.0 ± 0.0 |"
  assert table[2] == "| pretrained | 0.000 ± 0.000 | — | 9.0 ± 0.0 |"
  assert "pearson 0.500 ± 0.100" in table[-1]


def test_one_seed_has_no_sd(tmp_path):
  _write(str(tmp_path), 0)
  summary = seeds.aggregate(str(tmp_path), [0])
  assert summary["policies"]["ppo"]["gold_mean"] == {"mean": 0.1, "sd": None, "values": [0.1]}
  assert "| ppo | 0.100 | 1.00 | 12.0 |" in seeds.markdown(summary)


def test_missing_or_mismatched_seeds_are_named(tmp_path):
  root = str(tmp_path)
  _write(root, 0)
  with pytest.raises(FileNotFoundError, match="seed_1/results.json does not exist"):
    seeds.aggregate(root, [0, 1])
  _write(seeds.seed_workdir(root, 1), 1)
  results = _results(1)
  del results["ppo"]
  with open(os.path.join(root, "seed_1", "results.json"), "w") as f:
    json.dump(results, f)
  with pytest.raises(ValueError, match=r"seed_1/results.json: policies \['best_of_4'"):
    seeds.aggregate(root, [0, 1])


def test_a_workdir_of_another_seed_is_refused(tmp_path):
  os.makedirs(tmp_path / "pretrain")
  with open(tmp_path / "pretrain" / "config.json", "w") as f:
    json.dump({"seed": 3, "stage": "pretrain"}, f)
  seeds.check_seed(str(tmp_path), 3)
  with pytest.raises(ValueError, match="seed 3, but --seeds puts seed 0"):
    seeds.run_seeds(ml_collections.ConfigDict({"seed": 0}), str(tmp_path), [0],
                    lambda c, w: pytest.fail("must not run"))
