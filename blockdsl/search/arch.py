"""Architectures of a space: how a choice becomes an Optuna suggestion, how a bound
architecture is named (canonical text, hash, one-line summary), and the start design (the
baseline's nearest point and its one-change neighbours).

The hash is what deduplication keys on, so it must not depend on choice names, the file,
comments or the trial: it is the sha256 of `render` of the bound Plan under a fixed name,
comments dropped, plus any training hyper-parameter the space varies (two trials of one
block with different learning rates are different experiments).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from blockdsl.lang.errors import BlockError
from blockdsl.lang.expr import eval_expr
from blockdsl.plan import ChoiceDef, Plan
from blockdsl.search.constraints import static_metrics, violation
from blockdsl.search.space import STATIC_METRICS, Space, bind_train_variables

if TYPE_CHECKING:
    import optuna

OPTION_SUFFIX = "@option"


def suggest(trial: optuna.Trial, c: ChoiceDef) -> Any:
    """One choice of the space as an Optuna suggestion (names are the choice names).

    A categorical choice whose options are computed from another choice (`{2*d | 4*d}`
    with `d` a choice) has different values in every trial, which Optuna's categorical
    distribution cannot hold: it is suggested as the option's position instead, under the
    stable name `<choice>@option`, and the value is that option evaluated in this trial.
    """
    if c.kind == "categorical" and c.dynamic:
        i = trial.suggest_categorical(c.name + OPTION_SUFFIX, list(range(len(c.values))))
        return c.values[i]
    if c.kind == "categorical":
        values = [str(v) if isinstance(v, str) else v for v in c.values]
        return trial.suggest_categorical(c.name, values)
    if c.kind == "int":
        step = int(c.step) if c.step and not c.log else 1
        return trial.suggest_int(c.name, int(c.lo), int(c.hi), step=step, log=c.log)
    return trial.suggest_float(c.name, float(c.lo), float(c.hi),
                               step=None if c.log else c.step, log=c.log)


def canonical_text(plan: Plan, train_vars: dict[str, Any] | None = None) -> str:
    """The architecture as text independent of choice names and file: render under a fixed
    name, comments dropped, plus the training hyper-parameters the space binds."""
    from blockdsl.lang.render import render

    body = [ln for ln in render(plan, name="candidate").splitlines() if not ln.startswith("#")]
    extra = [f"# train {k}={v!r}" for k, v in sorted((train_vars or {}).items())]
    return "\n".join(body + extra) + "\n"


def arch_hash(plan: Plan, train_vars: dict[str, Any] | None = None) -> str:
    return hashlib.sha256(canonical_text(plan, train_vars).encode()).hexdigest()[:20]


def arch_summary(plan: Plan) -> str:
    """One line: width, the stack and sharing, e.g. `d=64 (mha mlp topk)x3 (3 unique)`."""
    units: list[list[str]] = [[] for _ in range(plan.n_units)]
    for layer in plan.layers:
        units[layer.unit].append(layer.prim)
    parts: list[list[Any]] = []
    for u in units:
        text = " ".join(u)
        if parts and parts[-1][0] == text:
            parts[-1][1] += 1
        else:
            parts.append([text, 1])
    stack = " ".join(f"({t})" + (f"x{n}" if n > 1 else "") for t, n in parts)
    unique = len({layer.key for layer in plan.layers})
    shared = f" ({unique} unique)" if unique < len(plan.layers) else ""
    return f"d={plan.d} {stack}{shared}"


class _Probe:
    """Stands in for an Optuna trial while the start design walks the space without a study:
    `suggest_*` returns the value assigned to a parameter when it is one the parameter can
    take, else the first option, and records every parameter met with the values it could
    have taken (so the walk sees the conditional parameters of *this* assignment only)."""

    MAX_VALUES = 16  # a wide numeric range is probed at this many evenly spaced points

    def __init__(self, assignment: dict[str, Any]):
        self.assignment = assignment
        self.params: dict[str, Any] = {}
        self.domains: dict[str, list[Any]] = {}
        self.train_vars: dict[str, Any] = {}

    def _pick(self, name: str, domain: list[Any]) -> Any:
        v = self.assignment.get(name, domain[0])
        if v not in domain:
            v = domain[0]
        self.params[name], self.domains[name] = v, domain
        return v

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._pick(name, list(choices))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        vals = list(range(low, high + 1, step)) if not log else sorted(
            {int(round(low * (high / low) ** (i / 7))) for i in range(8)} if low > 0 else {low, high})
        if len(vals) > self.MAX_VALUES:
            k = self.MAX_VALUES - 1
            vals = sorted({vals[round(i * (len(vals) - 1) / k)] for i in range(k + 1)})
        return self._pick(name, vals)

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None,
                      log: bool = False) -> float:
        if log and low > 0:
            vals = [low * (high / low) ** (i / 4) for i in range(5)]
        else:
            vals = [low + (high - low) * i / 4 for i in range(5)]
        if step:
            vals = sorted({min(high, low + round((v - low) / step) * step) for v in vals})
        return self._pick(name, vals)


def _probe(space: Space, assignment: dict[str, Any]) -> tuple[_Probe, Plan] | None:
    """Resolve the space at `assignment` (training variables bound too; `pr.train_vars`)."""
    pr = _Probe(assignment)
    try:
        plan = space.resolve(chooser=lambda c: suggest(pr, c))  # type: ignore[arg-type]
        pr.train_vars = bind_train_variables(space, plan, lambda c: suggest(pr, c))  # type: ignore[arg-type]
    except (BlockError, ValueError):
        return None
    return pr, plan


def _tokens(plan: Plan) -> list[str]:
    import re

    return re.findall(r"[^\s,()=]+", canonical_text(plan))


def _distance(a: list[str], b: list[str]) -> int:
    """Tokens of canonical text that differ (an edit count: 0 = the same architecture).
    Tokens, not lines: a slot of the right kind with one wrong width is nearer than a
    slot of the wrong kind, which is what lets the descent get there one step at a time."""
    import difflib

    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in sm.get_opcodes() if op != "equal")


def baseline_point(space: Space, passes: int = 3) -> tuple[dict[str, Any], int] | None:
    """The point of the space nearest the baseline, and its distance (0: the baseline itself).

    Coordinate descent on the canonical text: starting from every choice's first option,
    each parameter in turn takes the value that brings the resolved block closest to the
    baseline's text; a few passes settle the conditional parameters a change brings in.
    Only resolving is involved (milliseconds a point), no torch.
    """
    if space.baseline is None:
        return None
    try:
        target = _tokens(space.resolve_baseline())
    except BlockError:
        return None
    got = _probe(space, {})
    if got is None:
        return None
    cur = dict(got[0].params)
    best = _distance(_tokens(got[1]), target)
    for _ in range(passes):
        improved = False
        pr, _plan = _probe(space, cur) or (None, None)
        if pr is None:
            break
        for name in list(pr.domains):
            for v in pr.domains[name]:
                if v == cur.get(name):
                    continue
                got = _probe(space, {**cur, name: v})
                if got is None:
                    continue
                point = dict(got[0].params)
                d = _distance(_tokens(got[1]), target)
                # A change that brings in parameters (a slot turned into an FFN brings its
                # width) is judged with those set as well as they can be: one at a time.
                for new in [k for k in got[0].domains if k not in cur]:
                    for w in got[0].domains[new]:
                        g2 = _probe(space, {**point, new: w})
                        if g2 is not None:
                            d2 = _distance(_tokens(g2[1]), target)
                            if d2 < d:
                                d, point = d2, dict(g2[0].params)
                if d < best:
                    best, cur, improved = d, point, True
            if best == 0:
                return cur, 0
        if not improved:
            break
    return cur, best


def neighbourhood(space: Space, limit: int, seed: int = 0) -> list[dict[str, Any]]:
    """Up to `limit` one-change neighbours of the baseline's point, in a seeded order, most
    promising first: distinct architectures, none the baseline's, and ones whose static
    metrics (params, FLOPs: known without torch) already break a constraint left out.

    Why: in a space where most random points break the constraint (the default space: 197
    of 200 random blocks were slower than the baseline), a short search that starts at
    random trains almost nothing; the baseline's neighbours are mostly feasible, and their
    results tell the sampler which single changes help.
    """
    import random

    from blockdsl.graph import report

    start = baseline_point(space)
    if start is None or limit <= 0:
        return []
    point, _ = start
    pr, _plan = _probe(space, point) or (None, None)
    if pr is None:
        return []
    base_plan = space.resolve_baseline()
    base_hash = arch_hash(base_plan)
    base_static = static_metrics(report(base_plan))
    static_cons = [(m, op, b) for m, op, b, _ in space.constraints if m in STATIC_METRICS]
    cands: list[tuple[dict[str, Any], str]] = []
    seen = {base_hash}
    for name, domain in pr.domains.items():
        for v in domain:
            if v == point.get(name):
                continue
            got = _probe(space, {**point, name: v})
            if got is None:
                continue
            probe, plan = got
            h = arch_hash(plan, probe.train_vars)
            if h in seen:
                continue
            seen.add(h)
            if static_cons:
                m = static_metrics(report(plan))
                if any(violation(m[k], op, float(eval_expr(b, {"baseline": base_static[k]}))) > 0
                       for k, op, b in static_cons):
                    continue
            cands.append((dict(probe.params), name))
    rng = random.Random(seed)
    rng.shuffle(cands)
    # Round-robin over the parameters changed, so a short list covers many of them.
    by_param: dict[str, list[dict[str, Any]]] = {}
    for params, name in cands:
        by_param.setdefault(name, []).append(params)
    out: list[dict[str, Any]] = []
    while len(out) < limit and any(by_param.values()):
        for name in list(by_param):
            if by_param[name] and len(out) < limit:
                out.append(by_param[name].pop())
    return out
