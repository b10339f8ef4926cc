"""Identical architectures are trained once.

Concurrent workers agree on who trains a repeated architecture with Lamport's bakery
protocol over trial attributes (neither storage offers a compare-and-swap); the others
wait and copy the result. The key is `arch.arch_hash`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from blockdsl.search import optuna_glue as glue
from blockdsl.search.optuna_glue import ATTR

FINAL_STATUSES = ("trained", "pruned", "infeasible", "failed")


def _same_hash(study: optuna.Study, h: str, me: int) -> list[FrozenTrial]:
    return [t for t in glue.all_trials(study)
            if glue.trial_id(t) != me and t.system_attrs.get(ATTR + "hash") == h]


def _result_of(t: FrozenTrial) -> bool:
    """A finished trial holding a result for its architecture (not a lost/surplus one)."""
    return t.state.is_finished() and t.user_attrs.get("status") in FINAL_STATUSES + ("copy",)


def claim_architecture(study: optuna.Study, trial: optuna.Trial, h: str,
                       poll: float = 0.3, on_wait: Callable[[], None] | None = None
                       ) -> FrozenTrial | None:
    """Decide whether this trial trains architecture `h` or copies an earlier result.

    Lamport's bakery over trial attributes, scoped to one hash: take a ticket one above
    every ticket seen for `h`, then wait while a same-hash trial is choosing its ticket or
    holds a smaller (ticket, number). The winner trains; when it finishes, the waiters see
    its result and copy it. A dead winner is reaped (failed) and stops blocking. Returns
    the trial to copy, or None to train.
    """
    tid = glue.trial_id(trial)
    glue.set_system_attr(study, trial, ATTR + "choosing", h)
    glue.set_system_attr(study, trial, ATTR + "hash", h)
    others = _same_hash(study, h, tid)
    done = [t for t in others if _result_of(t)]
    if done:
        glue.set_system_attr(study, trial, ATTR + "choosing", None)
        return min(done, key=lambda t: t.number)
    ticket = 1 + max((int(t.system_attrs.get(ATTR + "ticket") or 0) for t in others), default=0)
    glue.set_system_attr(study, trial, ATTR + "ticket", ticket)
    glue.set_system_attr(study, trial, ATTR + "choosing", None)
    mine = (ticket, trial.number)
    while True:
        others = _same_hash(study, h, tid)
        done = [t for t in others if _result_of(t)]
        if done:
            return min(done, key=lambda t: t.number)
        blockers = []
        for t in others:
            if t.state != TrialState.RUNNING:
                continue
            if t.system_attrs.get(ATTR + "choosing") == h:
                blockers.append(t)
                continue
            tk = t.system_attrs.get(ATTR + "ticket")
            if tk is not None and (int(tk), t.number) < mine:
                blockers.append(t)
        if not blockers:
            return None
        if on_wait is not None:
            on_wait()
        time.sleep(poll)
