"""What several registry entries share: argument checks and the dense-MLP formulas.

Kept apart from `base.py` (the entry types and the table) so that a family module reads
as "the types, the shared helpers, then its entries"; a new primitive may use these or
write its own.
"""

from __future__ import annotations

from typing import Any

from blockdsl.names import is_gated
from blockdsl.primitives.base import ArgError, Ctx


def gated_factor(act: str) -> int:
    return 2 if is_gated(act) else 1


def mlp_params(d: int, f: int, act: str, bias: bool) -> int:
    g = gated_factor(act)
    return d * g * f + (g * f if bias else 0) + f * d + (d if bias else 0)


def mlp_flops(d: int, f: int, act: str) -> float:
    return 2.0 * (d * gated_factor(act) * f + f * d)


def positive(a: dict[str, Any], *names: str) -> None:
    for n in names:
        v = a.get(n)
        if v is not None and not isinstance(v, bool) and v <= 0:
            raise ArgError(f"{n}={v} must be positive", n, f"{n} is a size or count: use {n} >= 1")


def nonneg(a: dict[str, Any], *names: str) -> None:
    for n in names:
        if a.get(n) is not None and a[n] < 0:
            raise ArgError(f"{n}={a[n]} must not be negative", n, f"use {n}=0 to turn it off")


def prob(a: dict[str, Any], *names: str) -> None:
    for n in names:
        if not 0.0 <= a[n] < 1.0:
            raise ArgError(f"{n}={a[n]} must be in [0, 1)", n, f"{n} is a probability")


def k_le_experts(a: dict[str, Any]) -> None:
    if a["k"] > a["experts"]:
        raise ArgError(
            f"k={a['k']} exceeds experts={a['experts']}",
            "k",
            "each token picks k distinct experts, so k must be at most the number of experts",
        )


def d4(ctx: Ctx, a: dict[str, Any]) -> int:
    """The usual FFN width, 4·d."""
    return 4 * ctx.d
