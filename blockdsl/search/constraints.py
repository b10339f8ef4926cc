"""A space's constraints judged against a trial's metrics, and written where Optuna's
samplers and optuna-dashboard read them.

A constraint's value follows Optuna's convention (<= 0 feasible) and is relative to its
bound, so params in millions and step times in milliseconds weigh alike in the violation
sums NSGA-II and TPE rank infeasible trials by. A bound may name `baseline` (the
baseline's value of the same metric); `step_time` is only judged once it was measured,
the static metrics (params, FLOPs) from the IR alone, before any torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from blockdsl.lang import ir
from blockdsl.lang.expr import eval_expr
from blockdsl.search import optuna_glue as glue
from blockdsl.search.errors import SearchError

if TYPE_CHECKING:
    import optuna

    from blockdsl.search.space import Space


def violation(value: float, op: str, bound: float) -> float:
    """Optuna's convention: <= 0 feasible. Relative to the bound, so units do not matter."""
    scale = abs(bound) if bound else 1.0
    if op in ("<=", "<"):
        return (value - bound) / scale
    return (bound - value) / scale


def static_metrics(rep: Any) -> dict[str, float]:
    return {"params": float(rep.stored_params), "active_params": float(rep.active_params_per_token),
            "flops": float(rep.flops_per_token)}


def uses_baseline(e: Any) -> bool:
    if isinstance(e, ir.Name):
        return e.id == "baseline"
    if isinstance(e, ir.BinOp):
        return uses_baseline(e.left) or uses_baseline(e.right)
    if isinstance(e, (ir.Neg,)):
        return uses_baseline(e.operand)
    if isinstance(e, ir.Func):
        return any(uses_baseline(a) for a in e.args)
    return False


def stop_ratio(space: Space) -> float | None:
    """Give up timing a candidate 25% past the tightest `step_time <= c * baseline`."""
    cs = [float(eval_expr(bound, {"baseline": 1.0})) for m, op, bound, _ in space.constraints
          if m == "step_time" and op in ("<=", "<") and uses_baseline(bound)]
    return 1.25 * min(cs) if cs else None


def bound_value(bound: ir.Expr, base: float | None, text: str) -> float:
    if base is None and uses_baseline(bound):
        raise SearchError(f"constraint `{text}` uses the baseline, but the space names none")
    return float(eval_expr(bound, {"baseline": base} if base is not None else {}))


def violations(space: Space, metrics: dict[str, float], base: dict[str, float]) -> list[str]:
    """Constraints violated by the metrics known so far (the others are not judged yet)."""
    out = []
    for metric, op, bound, text in space.constraints:
        if metric not in metrics:
            continue
        b = bound_value(bound, base.get(metric), text)
        v = metrics[metric]
        if violation(v, op, b) > 0 or (op in ("<", ">") and v == b):
            out.append(f"{text}: {fmt(v)} vs {fmt(b)}")
    return out


def set_constraints(space: Space, trial: optuna.Trial, metrics: dict[str, float],
                    base: dict[str, float]) -> None:
    """Every constraint gets a value (Optuna: <= 0 feasible); unmeasured ones count as met."""
    values = []
    for metric, op, bound, text in space.constraints:
        if metric in metrics:
            v = violation(metrics[metric], op, bound_value(bound, base.get(metric), text))
        else:
            v = 0.0
        values.append((text, v))
    write_constraints(trial, values)


DASHBOARD_CONSTRAINTS = "constraints"


def write_constraints(trial: optuna.Trial, values: Sequence[tuple[str, float]]) -> None:
    """Constraint values (<= 0 feasible) in both forms readers use.

    Optuna 5's `set_constraint` stores one `constraints:<name>` system attribute each, which
    its samplers read; optuna-dashboard (0.21) reads only the older `constraints` attribute,
    a list of floats, and without it shows an infeasible trial as an ordinary completed
    result. So the list (in the space's constraint order) is written too. Optuna reads
    both forms into `trial.constraints` (the list as keys "0", "1", ...): every value
    appears twice there, which changes neither feasibility nor the order of violation
    sums its samplers rank infeasible trials by.
    """
    for name, v in values:
        trial.set_constraint(name, v)
    if values:
        glue.set_trial_system_attr(trial, DASHBOARD_CONSTRAINTS, [float(v) for _, v in values])


def fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.2f}M"
    if a >= 1e3:
        return f"{v / 1e3:.1f}K"
    if a >= 1 or a == 0:
        return f"{v:.3g}"
    return f"{v:.3g}"
