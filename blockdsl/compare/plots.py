"""The comparison's two figures (matplotlib's Agg canvas, no pyplot state):

- loss.png: validation loss against steps, tokens and training seconds, one colour per
  model, the mean over seeds as a line and the seeds' min..max as a band;
- summary.png: final validation loss (mean, std error bar, each seed a dot) beside stored
  parameters, FLOPs per token and measured step time, so a loss gap is read next to the
  size and speed it was bought with.

Why interpolate the seeds on a common grid: under a seconds budget each seed evaluates
at its own times; on a grid over the range all seeds cover, mean and band are defined.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from blockdsl.compare.setup import Entrant

AXES = (("step", "step"), ("tokens", "tokens (images for a classifier)"),
        ("train_seconds", "training seconds"))


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_curves(ents: list[Entrant], done: dict[tuple[str, int], dict], path: Path,
                title: str) -> Path:
    fig = _figure(13, 3.8)
    axes = fig.subplots(1, len(AXES), sharey=True)
    for i, e in enumerate(ents):
        runs = [r for (label, _), r in done.items() if label == e.label]
        colour = f"C{i}"
        for ax, (key, _) in zip(axes, AXES):
            curves = [(np.array([ev[key] for ev in r["evals"] if key in ev], float),
                       np.array([ev["val_loss"] for ev in r["evals"] if key in ev], float))
                      for r in runs]
            curves = [(x, y) for x, y in curves if len(x) > 1]
            if not curves:
                continue
            lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
            grid = np.linspace(lo, hi, 60) if hi > lo else curves[0][0]
            ys = np.stack([np.interp(grid, x, y) for x, y in curves])
            ax.plot(grid, ys.mean(0), color=colour, lw=1.6,
                    label=f"{e.label} ({len(curves)} seeds)")
            if len(curves) > 1:
                ax.fill_between(grid, ys.min(0), ys.max(0), color=colour, alpha=0.2, lw=0)
    for ax, (_, name) in zip(axes, AXES):
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: mean over seeds, band = min..max")
    fig.tight_layout()
    return _save(fig, path)


def plot_summary(results: dict[str, Any], path: Path, title: str) -> Path:
    rows = results["entrants"]
    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    colours = [f"C{i}" for i in range(len(rows))]
    fig = _figure(13, 3.8)
    ax_loss, ax_p, ax_f, ax_t = fig.subplots(1, 4)
    for i, r in enumerate(rows):
        if r["val_loss"] is None:
            continue
        s = r["val_loss"]
        ax_loss.bar(i, s["mean"], color=colours[i], alpha=0.6, yerr=s["std"], capsize=4)
        vals = list(r["val_loss_per_seed"].values())
        ax_loss.plot([i] * len(vals), vals, "k.", ms=5)
    means = [r["val_loss"]["mean"] for r in rows if r["val_loss"]]
    if means:
        spread = max(max(means) - min(means), 0.02)
        ax_loss.set_ylim(min(means) - 1.5 * spread, max(means) + 1.5 * spread)
    ax_loss.set_title("final validation loss", fontsize=10)
    for ax, key, name in ((ax_p, "stored_params", "stored parameters"),
                          (ax_f, "flops_per_token", "forward FLOPs / token"),
                          (ax_t, "step_seconds", "step time, paired (ms)")):
        vals = [(r.get(key) or 0) * (1000 if key == "step_seconds" else 1) for r in rows]
        ax.bar(x, vals, color=colours, alpha=0.6)
        ax.set_title(name, fontsize=10)
    for ax in (ax_loss, ax_p, ax_f, ax_t):
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
