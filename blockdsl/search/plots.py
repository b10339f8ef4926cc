"""The picture of a study: optimisation history (one objective) or Pareto front (two).
matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import math
from pathlib import Path

import optuna

from blockdsl.files import atomic_write
from blockdsl.search.results import best_trials, trial_rows


def plot_study(study: optuna.Study, path: Path, shows: dict[str, int] | None = None) -> Path | None:
    """Optimisation history (single objective) or Pareto front (first two objectives).

    `shows` receives how many points of each kind were drawn. The history always spans
    the study's trials and marks the infeasible ones along its foot, so a short search that
    trained nothing but the baseline still shows what it tried (not an empty 0..1 frame).
    """
    shows = shows if shows is not None else {}
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = trial_rows(study)
    objectives = study.user_attrs.get("objectives") or [["val_loss", "minimize"]]
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    base = next((r for r in rows if r.role == "baseline" and r.values), None)
    if len(study.directions) == 1:
        pts = [(r.number, r.values[0]) for r in rows if r.values and r.status == "trained"
               and r.role != "baseline" and r.feasible]
        pruned = [(r.number, r.val_loss) for r in rows if r.status == "pruned" and r.val_loss]
        copies = [(r.number, r.values[0]) for r in rows if r.status == "copy" and r.values
                  and r.feasible]
        if pts:
            ax.plot(*zip(*pts), "o", ms=4, label="trained")
        if copies:
            ax.plot(*zip(*copies), ".", ms=3, color="grey", label="repeat (reused)")
        if pruned:
            ax.plot(*zip(*pruned), "x", ms=4, color="tab:red", alpha=0.6,
                    label="pruned (value at rung)")
        allpts = sorted(pts + copies)
        if allpts:
            best, xs, ys = math.inf, [], []
            sign = 1 if study.directions[0].name == "MINIMIZE" else -1
            for n, v in allpts:
                best = min(best, sign * v)
                xs.append(n)
                ys.append(sign * best)
            ax.step(xs, ys, where="post", color="black", lw=1.2, label="best so far")
        if base is not None:
            ax.axhline(base.values[0], color="tab:green", ls="--", lw=1.2, label="baseline")
            ax.plot([base.number], [base.values[0]], "*", ms=11, color="tab:green")
        bad = [r.number for r in rows if r.role != "baseline" and (
            r.status == "infeasible" or (r.status in ("copy", "trained") and not r.feasible))]
        if bad:
            # Their value is the untrained model's (ln V): a mark at the foot, not a point.
            ax.plot(bad, [0.02] * len(bad), "|", ms=9, color="tab:purple",
                    transform=ax.get_xaxis_transform(), label="infeasible (not trained)")
        if rows:
            ax.set_xlim(-0.5, max(r.number for r in rows) + 0.5)
        ax.set_xlabel("trial")
        ax.set_ylabel(objectives[0][0])
        failed = sum(1 for r in rows if r.state == "FAIL")
        ax.set_title(f"{study.study_name}: optimisation history\n"
                     f"({len(pts)} trained, {len(bad)} infeasible, {failed} failed)", fontsize=10)
        shows.update(trained=len(pts), pruned=len(pruned), repeats=len(copies),
                     infeasible=len(bad), baseline=int(base is not None))
    else:
        xm, ym = objectives[1][0], objectives[0][0]
        pts = [(r.values[1], r.values[0]) for r in rows
               if r.values and r.status in ("trained", "copy") and r.feasible and r.role != "baseline"]
        front = best_trials(study)
        if pts:
            ax.plot(*zip(*pts), "o", ms=4, alpha=0.5, label="trials")
        if front:
            f = sorted((t.values[1], t.values[0]) for t in front)
            ax.plot(*zip(*f), "o-", color="tab:red", ms=5, label="Pareto front")
        if base is not None:
            ax.plot([base.values[1]], [base.values[0]], "*", ms=12, color="tab:green",
                    label="baseline")
        ax.set_xlabel(xm)
        ax.set_ylabel(ym)
        ax.set_title(f"{study.study_name}: Pareto front")
        shows.update(trials=len(pts), front=len(front), baseline=int(base is not None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path
