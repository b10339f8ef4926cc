"""The Plan: a resolved model as concrete layer instances, each naming the parameter group
it owns or shares. What every later stage (report, lower, train, search) reads. Torch-free.

It imports nothing of the language: resolve builds Plans, so the Plan module sits below
it and every later stage can read a Plan without the parser. A Plan carries source spans
(for located errors after resolve) only as `SourceSpan`, the little it needs of one; the
language's `ir.Span` is one. The two small records (ChoiceDef, NormPlan) are NamedTuples,
the others frozen dataclasses (`dataclasses.replace` derives plans from them): the same
immutability and repr, and a NamedTuple costs a tenth of a frozen dataclass to define at
every `blockdsl check`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from blockdsl.taskio import TaskIO


class SourceSpan(Protocol):
    """Where in a .block file something was written (`lang.ir.Span` is one)."""

    file: str
    line: int
    col: int


class ChoiceDef(NamedTuple):
    """A search choice as the sampler sees it (defined by `lang.expr.choice_def`)."""

    name: str
    kind: str  # "categorical" | "int" | "float"
    values: tuple[Any, ...] = ()
    lo: float = 0
    hi: float = 0
    step: float | None = None
    log: bool = False
    span: SourceSpan | None = None
    # Categorical options computed from another choice (`{2*d | 4*d}`, d a choice): the
    # values change from trial to trial, so a sampler must pick an option's position.
    dynamic: bool = False


class NormPlan(NamedTuple):
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
    span: SourceSpan

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
    span: SourceSpan | None = None
    default_norm: tuple[str, dict[str, Any]] = ("layernorm", {"eps": 1e-5, "bias": True})

    # Derived facts are properties, not fields: they follow from the fields, so storing
    # them would let a Plan contradict itself (and would change its repr and equality).

    @property
    def vocab(self) -> int:
        """Token vocabulary of a language model; 0 for a classifier."""
        return self.stem[1]["vocab"] if self.stem[0] == "tokens" else 0

    @property
    def io_width(self) -> int:
        """Width of the embedding, final norm and head: K·d under wide AltUp, else d."""
        if self.altup and self.altup["mode"] == "wide":
            return self.d * self.altup["k"]
        return self.d

    @property
    def image_size(self) -> int | None:
        """A classifier's image side in pixels; None for a language model."""
        return self.stem[1]["image"] if self.stem[0] == "patches" else None

    @property
    def channels(self) -> int | None:
        """A classifier's image channels; None for a language model."""
        return self.stem[1]["channels"] if self.stem[0] == "patches" else None

    @property
    def num_classes(self) -> int | None:
        """A classifier's number of classes; None for a language model."""
        return self.head[1]["classes"] if self.head[0] == "classify" else None

    @property
    def io(self) -> TaskIO:
        """The task's inputs and outputs in one typed value (see TaskIO)."""
        from blockdsl.taskio import TaskIO  # only lowering and training ask: not `check`

        sa = self.stem[1]
        if self.stem[0] == "tokens":
            return TaskIO(self.task, seq=self.seq, vocab=sa["vocab"], width=self.io_width,
                          name=self.name)
        return TaskIO(self.task, seq=self.seq, image_size=sa["image"], channels=sa["channels"],
                      classes=self.num_classes, width=self.io_width, patch=sa["patch"],
                      name=self.name)
