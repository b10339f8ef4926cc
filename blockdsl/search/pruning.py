"""Stopping trials early at rungs (25%, 50%, 75% of the budget).

Single-objective studies prune with `RungPruner` (worse than a quantile of all trials at
the rung); multi-objective studies, which Optuna's pruners do not cover, with
`ParetoRungPruner`: at a rung a trial is stopped when another trial that reached the same
rung is no worse in every objective and better in one (val loss at that rung, the rest
known before training).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial


def dominates(a: Sequence[float], b: Sequence[float], margin0: float = 0.0) -> bool:
    """a dominates b (all minimised): no worse everywhere, better somewhere; the first
    coordinate (the rung's loss) must be better by at least `margin0` to count."""
    if a[0] > b[0] - margin0:
        return False
    return all(x <= y for x, y in zip(a[1:], b[1:])) and (
        a[0] < b[0] or any(x < y for x, y in zip(a[1:], b[1:])))


class RungPruner(optuna.pruners.BasePruner):
    """Single-objective pruning at rungs, asynchronous successive halving style.

    At rung r a trial is stopped when its value is worse than the `quantile` of the values
    every other trial reported at rung r (finished, pruned or still running; repeats of an
    architecture counted once), once at least `startup` trials reached it. Unlike Optuna's
    MedianPruner this neither counts trials that never trained (infeasible, copies) as
    start-up trials nor compares only against the survivors that completed.
    """

    def __init__(self, startup: int = 5, quantile: float = 0.5):
        self.startup, self.quantile = startup, quantile

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        refs = sorted(t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                      if t.number != trial.number and step in t.intermediate_values
                      and t.user_attrs.get("status") != "copy")
        if len(refs) < self.startup:
            return False
        if study.direction.name == "MAXIMIZE":
            refs, value = [-v for v in reversed(refs)], -value
        k = min(len(refs) - 1, int(self.quantile * (len(refs) - 1) + 0.5))
        return value > refs[k]


class ParetoRungPruner:
    """Pruning for multi-objective studies (Optuna's pruners are single-objective only).

    Every trial records the trained metric at each rung (`rungs` user attribute). At rung r a
    trial is pruned when at least `startup` other trials reached rung r and one of them
    dominates it on (metric at rung r, every objective known before training). Objectives
    known before training (params, FLOPs, step time) cannot improve with training, so such a
    trial is unlikely to reach the final Pareto front; the margin guards against noise.
    """

    def __init__(self, startup: int = 5, margin: float = 0.0):
        self.startup, self.margin = startup, margin

    def should_prune(self, point: Sequence[float], rung: int,
                     others: Iterable[FrozenTrial], sign: float = 1.0) -> bool:
        """`point` = [sign * metric at this rung, *pre-training objectives], all minimised."""
        refs = []
        for t in others:
            r = (t.user_attrs.get("rungs") or {}).get(str(rung))
            static = t.user_attrs.get("pre_values")
            if r is None or static is None or len(static) != len(point) - 1:
                continue
            refs.append([sign * float(r)] + [float(v) for v in static])
        if len(refs) < self.startup:
            return False
        return any(dominates(ref, point, self.margin) for ref in refs)
