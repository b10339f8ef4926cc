"""The numbers a comparison rests on: spread over seeds, which differences lie outside the
seed noise, and whether the compared models are the same size. Torch-free and pure, so the
rules are tested on hand-made numbers.

Why this rule for "outside the noise": papers compare a handful of seeds, so a t-test's
p-value at n = 2-3 would claim more than the data holds. A difference counts as real here
only when (1) the seed ranges [min, max] do not overlap and (2) it exceeds twice its
standard error (Welch: sqrt(s_a^2/n_a + s_b^2/n_b)). Both need at least two seeds per
model; with one, nothing is called real. The per-seed wins (same seed: same data order and
initial RNG state) are reported beside it, since at n = 3 "3 of 3" says more than a t.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# quantities whose inequality breaks an "equal size" or "equal compute" claim
SIZE_KEYS = (("stored_params", "stored parameters"),
             ("active_params", "active parameters per token"),
             ("flops_per_token", "FLOPs per token"))


@dataclass(frozen=True)
class Spread:
    """Mean, sample std (ddof 1; 0 for one value), range and count of per-seed values."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def spread(values: list[float]) -> Spread:
    if not values:
        raise ValueError("no values to summarise")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Spread(mean, std, min(values), max(values), n)


@dataclass(frozen=True)
class Difference:
    """b minus a in a metric (lower is better): the difference of means, its standard
    error, their ratio, whether the seed ranges overlap, the seeds b won, and the verdict."""

    a: str
    b: str
    diff: float
    se: float
    t: float | None
    ranges_overlap: bool
    wins: int  # seeds (paired by seed number) where b is lower than a
    paired: int  # seeds both ran
    separated: bool  # outside the seed noise (module docstring)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def difference(a: str, b: str, va: dict[int, float], vb: dict[int, float]) -> Difference:
    """Compare b with a from their values per seed (`{seed: value}`)."""
    sa, sb = spread(list(va.values())), spread(list(vb.values()))
    diff = sb.mean - sa.mean
    se = math.sqrt(sa.std**2 / sa.n + sb.std**2 / sb.n)
    t = diff / se if se > 0 else None
    overlap = not (sb.max < sa.min or sa.max < sb.min)
    common = sorted(set(va) & set(vb))
    wins = sum(1 for s in common if vb[s] < va[s])
    enough = sa.n >= 2 and sb.n >= 2
    separated = enough and not overlap and (se == 0 or abs(diff) > 2 * se)
    return Difference(a, b, diff, se, t, overlap, wins, len(common), separated)


def size_warnings(rows: list[dict[str, Any]], tolerance: float) -> list[str]:
    """One plain sentence per quantity in SIZE_KEYS (and measured step time) on which the
    largest model exceeds the smallest by more than `tolerance` (a fraction)."""
    out = []
    keys = [*SIZE_KEYS, ("step_seconds", "measured step time")]
    for key, what in keys:
        vals = [(r[key], r["label"]) for r in rows if r.get(key)]
        if len(vals) < 2:
            continue
        lo, hi = min(vals), max(vals)
        excess = hi[0] / lo[0] - 1
        if excess > tolerance + 1e-12:  # 1100/1000 - 1 is 0.10000000000000009
            claim = "equal step time" if key == "step_seconds" else (
                "equal compute" if key == "flops_per_token" else "equal parameters")
            fmt = (lambda v: f"{v * 1000:.3g} ms") if key == "step_seconds" else _num
            out.append(f"{what} differ by {excess:.1%} ({hi[1]} {fmt(hi[0])} vs "
                       f"{lo[1]} {fmt(lo[0])}), more than {tolerance:.0%}: "
                       f"this comparison is not at {claim}")
    return out


def _num(v: float) -> str:
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= k:
            return f"{v / k:.3g}{unit}"
    return f"{v:.3g}"
