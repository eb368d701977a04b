"""Figures of the reproductions (matplotlib, written as PNG)."""

import matplotlib

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def frontier(rows: list[dict], path: str) -> None:
  """Gold reward against KL to the reference, one colour per method, every seed a point."""
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  for i, method in enumerate(methods):
    pts = [r for r in rows if r["method"] == method]
    ax.errorbar([r["kl"] for r in pts], [r["gold"] for r in pts],
                xerr=[r["kl_stderr"] for r in pts], yerr=[r["gold_stderr"] for r in pts],
                fmt="o" if method != "SFT" else "*", ms=7 if method != "SFT" else 14,
                color=f"C{i}", alpha=0.8, capsize=2, label=method)
  ax.set_xlabel("KL(policy || SFT reference), nats per response")
  ax.set_ylabel("mean gold reward (VADER compound)")
  ax.set_title("Reward-KL frontier on the sentiment testbed\n(each point: one seed's final policy)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def overoptimization(panels: dict[str, list[dict]], fits: dict, path: str) -> None:
  """Gold (solid, left axis) and proxy (dashed, right axis) reward against sqrt(KL), one
  panel per method. The proxies are on their own, unbounded scales: sharing the gold
  reward's [-1, 1] axis would flatten it.

  panels: method -> rows with keys rm (proxy RM name), d (sqrt KL), gold, proxy, and
    optionally gold_stderr (drawn as a band).
  fits: (method, rm) -> callable d -> fitted gold reward gain (plotted dotted).
  """
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
  for ax, (method, rows) in zip(axes[0], panels.items()):
    proxy_ax = ax.twinx()
    rms = list(dict.fromkeys(r["rm"] for r in rows))
    for i, rm in enumerate(rms):
      pts = sorted((r for r in rows if r["rm"] == rm), key=lambda r: r["d"])
      d = np.array([r["d"] for r in pts])
      gold = np.array([r["gold"] for r in pts])
      ax.plot(d, gold, "o-", color=f"C{i}", label=f"gold, RM {rm}")
      if all("gold_stderr" in r for r in pts):
        err = np.array([r["gold_stderr"] for r in pts])
        ax.fill_between(d, gold - err, gold + err, color=f"C{i}", alpha=0.15)
      proxy_ax.plot(d, [r["proxy"] for r in pts], "s--", color=f"C{i}", alpha=0.5, ms=4,
                    label=f"proxy, RM {rm}")
      fit = fits.get((method, rm))
      if fit is not None:
        grid = np.linspace(0, d.max(), 100)
        ax.plot(grid, fit(grid) + pts[0]["gold"] - fit(np.asarray(pts[0]["d"])), ":",
                color=f"C{i}", label=f"fit, RM {rm}")
    ax.set_xlabel("sqrt(KL(policy || SFT)), sqrt(nats)")
    ax.set_ylabel("gold reward (solid; dotted: fit; band: ± 1 s.e.)")
    proxy_ax.set_ylabel("proxy reward (dashed; each RM on its own scale)")
    ax.set_title(f"{method}: n = 1 .. 256" if method == "best-of-n" else
                 f"{method}: checkpoints over training")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    proxy_handles = proxy_ax.get_legend_handles_labels()
    ax.legend(handles[0] + proxy_handles[0], handles[1] + proxy_handles[1], fontsize=7,
              loc="upper left")
  fig.suptitle("Reward-model over-optimisation (after Gao et al. 2022, fig. 1)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def training_curves(runs: dict[str, list[dict]], path: str) -> None:
  """Gold reward and KL to the reference against the iteration, and gold against KL.

  runs: label -> eval rows of a metrics.jsonl (keys step, gold_mean, gold_stderr, kl,
  kl_stderr), e.g. PPO against the learned reward model and against the gold reward.
  """
  fig, (ax_gold, ax_kl, ax_front) = plt.subplots(1, 3, figsize=(15, 4.4))
  for i, (label, rows) in enumerate(runs.items()):
    rows = sorted(rows, key=lambda r: r["step"])
    step = np.array([r["step"] for r in rows])
    values = {}
    for ax, key in ((ax_gold, "gold"), (ax_kl, "kl")):
      mean = np.array([r[f"{key}_mean" if key == "gold" else key] for r in rows], float)
      err = np.array([r.get(f"{key}_stderr", 0.0) for r in rows], float)
      values[key] = mean, err
      ax.plot(step, mean, "o-", color=f"C{i}", ms=4, label=label)
      ax.fill_between(step, mean - err, mean + err, color=f"C{i}", alpha=0.2)
    ax_front.errorbar(values["kl"][0], values["gold"][0], xerr=values["kl"][1],
                      yerr=values["gold"][1], fmt="o-", color=f"C{i}", ms=4, capsize=2,
                      label=label)
  ax_gold.set_ylabel("mean gold reward, held-out prompts")
  ax_kl.set_ylabel("KL to the SFT reference (nats)")
  for ax in (ax_gold, ax_kl):
    ax.set_xlabel("iteration")
  ax_front.set_xlabel("KL to the SFT reference (nats)")
  ax_front.set_ylabel("mean gold reward, held-out prompts")
  for ax in (ax_gold, ax_kl, ax_front):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("RL on the sentiment testbed: gold reward and KL during training "
               "(bands and bars: ± 1 s.e.)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def helpfulness_harmlessness(points: dict[str, list[tuple[float, float]]], path: str) -> None:
  """Harmlessness (1 - harm rate) against helpfulness (gold harshness): a curve per RL run
  (its start, then each checkpoint) and a marker per single policy; Bai et al. 2022,
  fig. 2, with gold measures in place of crowdworker Elo scores."""
  fig, ax = plt.subplots(figsize=(6.5, 4.8))
  for i, (label, pts) in enumerate(points.items()):
    x, y = zip(*pts)
    if len(pts) > 1:
      ax.plot(x, y, "-o", color=f"C{i}", ms=4, label=label)
      ax.annotate("end", (x[-1], y[-1]), textcoords="offset points", xytext=(4, 4),
                  fontsize=7, color=f"C{i}")
    else:
      ax.plot(x, y, "*" if label.startswith("S") else "s", color=f"C{i}", ms=11, label=label)
  ax.set_xlabel("helpfulness: gold harshness of the review asked for (-VADER)")
  ax.set_ylabel("harmlessness: 1 - rate of reviews that insult someone")
  ax.set_title("Helpfulness vs harmlessness on red-team prompts\n"
               "(curves: PPO checkpoints from their start; markers: single policies)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
