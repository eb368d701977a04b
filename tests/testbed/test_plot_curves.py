"""experiments.plot_curves: reads eval rows of RL runs, draws one PNG, names bad inputs."""

import json

import pytest

from experiments import plot_curves


def _write_run(path, rows):
  path.mkdir()
  with open(path / "metrics.jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def test_curves_png_from_eval_rows_only(tmp_path):
  train_row = {"step": 1, "split": "train", "loss": 0.5}
  evals = [{"step": s, "split": "eval", "gold_mean": 0.1 * s, "gold_stderr": 0.02,
            "kl": 0.5 * s, "kl_stderr": 0.1} for s in (2, 4, 6)]
  _write_run(tmp_path / "a", [train_row] + evals)
  assert [r["step"] for r in plot_curves.eval_rows(str(tmp_path / "a"))] == [2, 4, 6]
  out = tmp_path / "curves.png"
  plot_curves.plot([f"PPO=a={tmp_path / 'a'}"], str(out))
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_without_eval_rows_or_metrics_is_named(tmp_path):
  _write_run(tmp_path / "sft", [{"step": 1, "split": "eval", "loss": 1.0}])
  with pytest.raises(ValueError, match="has no eval row with gold_mean"):
    plot_curves.eval_rows(str(tmp_path / "sft"))
  with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
    plot_curves.eval_rows(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="expected LABEL=WORKDIR"):
    plot_curves.plot([str(tmp_path / "sft")], str(tmp_path / "x.png"))
