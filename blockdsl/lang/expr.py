"""Search choices as the sampler and resolve see them. Torch-free."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blockdsl.lang import ir


@dataclass(frozen=True)
class ChoiceDef:
    """A search choice as the sampler sees it."""

    name: str
    kind: str  # "categorical" | "int" | "float"
    values: tuple[Any, ...] = ()
    lo: float = 0
    hi: float = 0
    step: float | None = None
    log: bool = False
    span: ir.Span | None = None
    # Categorical options computed from another choice (`{2*d | 4*d}`, d a choice): the
    # values change from trial to trial, so a sampler must pick an option's position.
    dynamic: bool = False


Chooser = Callable[[ChoiceDef], Any]


def first_option(c: ChoiceDef) -> Any:
    """The default binding of an unbound choice: its first option (or a range's low end)."""
    return c.values[0] if c.kind == "categorical" else (int(c.lo) if c.kind == "int" else c.lo)
