"""The Plan: a resolved model as concrete layer instances, each naming the parameter group
it owns or shares. What every later stage (report, lower, train, search) reads. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blockdsl.lang import ir
from blockdsl.lang.expr import ChoiceDef


@dataclass(frozen=True)
class NormPlan:
    kind: str
    args: dict[str, Any]
    key: str  # parameter group

    def signature(self) -> tuple:
        return (self.kind, tuple(sorted(self.args.items())))


@dataclass(frozen=True)
class LayerPlan:
    """One sublayer instance: x -> x + f(x) with its norm(s), in stack order."""

    index: int
    unit: int  # which block application (AltUp wraps these)
    block: str
    repeat: int
    label: str
    prim: str
    family: str
    args: dict[str, Any]
    placement: str
    norms: tuple[NormPlan, ...]
    key: str  # parameter group of the primitive; equal keys = one shared module
    span: ir.Span

    def signature(self) -> tuple:
        return (self.prim, tuple(sorted(self.args.items())))


@dataclass(frozen=True)
class Plan:
    name: str
    file: str
    d: int
    task: str  # "lm" | "classify"
    seq: int  # tokens per example (context, or patches + class token)
    stem: tuple[str, dict[str, Any]]
    head: tuple[str, dict[str, Any]]
    final_norm: NormPlan | None
    altup: dict[str, Any] | None
    layers: tuple[LayerPlan, ...]
    n_units: int
    variables: dict[str, Any] = field(default_factory=dict)
    assignment: dict[str, Any] = field(default_factory=dict)
    choices: tuple[ChoiceDef, ...] = ()
    span: ir.Span | None = None
    default_norm: tuple[str, dict[str, Any]] = ("layernorm", {"eps": 1e-5, "bias": True})

    @property
    def vocab(self) -> int:
        return self.stem[1]["vocab"] if self.stem[0] == "tokens" else 0
