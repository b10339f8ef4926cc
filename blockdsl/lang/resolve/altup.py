"""Phase 4 of resolve: AltUp widening (`altup altup(k=2, ...)`), bound and checked.

After the layers because its bound on k is the number of block applications the layout
made. Torch-free.
"""

from __future__ import annotations

from typing import Any

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError
from blockdsl.lang.expr import Scope
from blockdsl.lang.resolve.args import bind_args
from blockdsl.primitives import ALTUP


def bind_altup(acall: ir.Call | None, scope: Scope, n_units: int) -> dict[str, Any] | None:
    """AltUp's bound arguments, or None without an `altup` statement."""
    if acall is None:
        return None
    if acall.name != "altup":
        raise BlockError(f"unknown widening '{acall.name}'", acall.span, "did you mean 'altup'?")
    altup, aspans = bind_args(acall, ALTUP, scope, "altup", None)
    if altup["k"] < 1:
        raise BlockError(
            f"altup k={altup['k']} must be at least 1",
            aspans["k"],
            "k is the widening factor; k=1 is the plain model",
        )
    if altup["k"] > n_units:
        raise BlockError(
            f"altup k={altup['k']} exceeds the {n_units} layers it wraps",
            aspans["k"],
            "with alternating selection every sub-block should be computed at least once; "
            "use k <= number of block applications",
        )
    return altup
