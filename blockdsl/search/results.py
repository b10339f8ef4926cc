"""Reading a study's outcome: which trials count against the budget, a row per trial, the
baseline, the best trial(s) and a summary with a one-sentence verdict. Pure reads of the
study (no files, no plotting), so `search show` and the workers' budget check share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from blockdsl.search.pruning import dominates


def counted_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that use up the budget: all but those replaced by a retry and surplus ones."""
    replaced = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return [t for t in trials if t.number not in replaced and t.user_attrs.get("status") != "surplus"]


def budget_done(study: optuna.Study, budget: int) -> bool:
    trials = counted_trials(study.get_trials(deepcopy=False))
    waiting = any(t.state == TrialState.WAITING for t in trials)
    return len(trials) >= budget and not waiting


@dataclass
class TrialRow:
    number: int
    state: str
    status: str
    role: str | None
    arch: str
    values: list[float] | None
    val_loss: float | None
    step_time: float | None
    ratio: float | None
    active_params: float | None
    note: str
    feasible: bool

    @classmethod
    def of(cls, t: FrozenTrial, retried: dict[int, int] | None = None) -> TrialRow:
        ua = t.user_attrs
        status = ua.get("status") or t.state.name.lower()
        note = ""
        if status == "copy":
            note = f"= #{ua.get('copy_of')} ({ua.get('copied_status')})"
        elif status == "infeasible":
            note = ua.get("infeasible", "")
        elif status in ("failed", "lost", "surplus", "interrupted"):
            note = ua.get("fail_reason", "")
        elif status == "pruned":
            rungs = ua.get("rungs") or {}
            note = f"pruned at rung {max(map(int, rungs))}" if rungs else "pruned"
        elif t.state == TrialState.FAIL and retried and t.number in retried:
            note = "worker lost"
        if retried and t.number in retried:
            note = (note + f"; retried as #{retried[t.number]}").lstrip("; ")
        feasible = all(v <= 0 for v in t.constraints.values())
        vl = ua.get("val_loss")
        if status == "pruned" or (status == "copy" and ua.get("copied_status") == "pruned"):
            rungs = ua.get("rungs") or {}
            vl = rungs[max(rungs, key=int)] if rungs else None
        return cls(t.number, t.state.name, status, ua.get("role"), ua.get("arch", ""),
                   list(t.values) if t.values else None,
                   None if status == "infeasible" else vl, ua.get("step_time"),
                   ua.get("step_time_ratio"), ua.get("active_params"), note, feasible)


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    return [TrialRow.of(t, retried) for t in trials]


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("role") == "baseline" and t.state == TrialState.COMPLETE:
            return t
    return None


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial (single objective) or the feasible Pareto set, baseline excluded.

    Excluded too are repeats of the baseline's architecture (a sampled point that
    deduplicates to it, `status=copy`): reporting one as the best block would present the
    baseline as a finding.
    """
    base = baseline_trial(study)
    base_hash = base.user_attrs.get("arch_hash") if base is not None else None
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("role") != "baseline"
                and (base_hash is None or t.user_attrs.get("arch_hash") != base_hash)
                and all(v <= 0 for v in t.constraints.values())
                and t.user_attrs.get("status") != "infeasible"
                and t.user_attrs.get("copied_status") != "infeasible"]
    if not complete:
        return []
    signs = [1.0 if d.name == "MINIMIZE" else -1.0 for d in study.directions]
    pts = [[s * v for s, v in zip(signs, t.values)] for t in complete]
    front = [t for t, p in zip(complete, pts) if not any(dominates(q, p) for q in pts)]
    # one per architecture (copies share values)
    seen, out = set(), []
    for t in sorted(front, key=lambda t: [s * v for s, v in zip(signs, t.values)]):
        h = t.user_attrs.get("arch_hash")
        if h not in seen:
            seen.add(h)
            out.append(t)
    return out if len(study.directions) > 1 else out[:1]


def summarize(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    statuses: dict[str, int] = {}
    for t in trials:
        s = t.user_attrs.get("status") or t.state.name.lower()
        statuses[s] = statuses.get(s, 0) + 1
    base = baseline_trial(study)
    objectives = study.user_attrs.get("objectives") or [["val_loss", "minimize"]]

    def pick(t: FrozenTrial | None) -> dict[str, Any] | None:
        if t is None:
            return None
        ua = t.user_attrs
        return {"number": t.number, "arch": ua.get("arch"), "values": list(t.values or []),
                "val_loss": ua.get("val_loss"), "step_time": ua.get("step_time"),
                "step_time_ratio": ua.get("step_time_ratio"), "params": ua.get("params"),
                "active_params": ua.get("active_params"), "flops": ua.get("flops"),
                "steps": ua.get("steps")}

    found = best_trials(study)
    best = [t for t in found if beats(t, base, study.directions)]
    closest = [t for t in found if t not in best][:1] if not best else []
    searched = [t for t in counted_trials(trials) if t.user_attrs.get("role") != "baseline"]
    feasible_trained = sum(1 for t in searched if _own_status(t) in ("trained", "pruned")
                           and all(v <= 0 for v in t.constraints.values()))
    infeasible = sum(1 for t in searched if _own_status(t) == "infeasible"
                     or t.user_attrs.get("copied_status") == "infeasible"
                     or (_own_status(t) in ("trained", "pruned")
                         and any(v > 0 for v in t.constraints.values())))
    started = [t.datetime_start for t in trials if t.datetime_start]
    ended = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ended) - min(started)).total_seconds() if started and ended else None
    return {
        "study": study.study_name, "space": study.user_attrs.get("space"),
        "objectives": objectives, "constraints": study.user_attrs.get("constraints", []),
        "trials": len(trials), "counted": len(counted_trials(trials)), "by_status": statuses,
        "trained": sum(1 for t in trials if t.user_attrs.get("status") in ("trained", "pruned")),
        "baseline": pick(base), "best": [pick(t) for t in best],
        "beats_baseline": bool(best) if base is not None else None,
        "closest": pick(closest[0]) if closest else None, "wall_seconds": wall,
        "searched": len(searched), "feasible_trained": feasible_trained,
        "infeasible": infeasible,
        "repeats": sum(1 for t in searched if _own_status(t) == "copy"),
        "verdict": _verdict(study, base, best, closest, len(searched), feasible_trained,
                            infeasible),
    }


def _own_status(t: FrozenTrial) -> str:
    return t.user_attrs.get("status") or t.state.name.lower()


def _verdict(study: optuna.Study, base: FrozenTrial | None, best: list[FrozenTrial],
             closest: list[FrozenTrial], searched: int, feasible: int, infeasible: int) -> str:
    """One sentence: what the search found, and why no block was written when none was."""
    cons = "; ".join(study.user_attrs.get("constraints") or [])
    within = f" within {cons}" if cons else ""
    base_v = f"{base.values[0]:.4f}" if base is not None and base.values else None
    trained = f"{feasible} of {searched} searched trials trained a new block{within}"
    if best:
        b = best[0]
        if len(best) > 1:
            return f"{trained}; {len(best)} blocks on the Pareto front beat the baseline"
        vs = f" vs the baseline's {base_v}" if base_v else ""
        return f"{trained}; best block: trial {b.number} ({b.values[0]:.4f}{vs})"
    if base is None:
        return f"no block found: {trained}"
    if searched == 0:
        return ("no best.block: the budget ran the baseline only, nothing was searched "
                "(raise --budget)")
    if feasible == 0:
        why = (f"{infeasible} broke {cons or 'a constraint'}" if infeasible
               else "none finished training")
        return (f"no best.block: none of the {searched} searched trials trained a block ({why});"
                " a larger --budget lets the sampler learn where the feasible blocks are")
    c = closest[0] if closest else None
    near = (f"; the closest, trial {c.number}: {c.values[0]:.4f} vs the baseline's {base_v}"
            if c is not None and c.values and base_v else "")
    return (f"no searched block beat the baseline (trial {base.number}), so no best.block: "
            f"{trained}{near}")


def beats(t: FrozenTrial, base: FrozenTrial | None, directions: Sequence[Any]) -> bool:
    """Whether `t` improves on the baseline: a better value (one objective), or a point the
    baseline does not weakly dominate (several). Without a baseline every trial counts."""
    if base is None or not base.values:
        return True
    signs = [1.0 if d.name == "MINIMIZE" else -1.0 for d in directions]
    p = [s * v for s, v in zip(signs, t.values)]
    q = [s * v for s, v in zip(signs, base.values)]
    if len(p) == 1:
        return p[0] < q[0]
    return not all(b <= a for a, b in zip(p, q))
