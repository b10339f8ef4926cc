"""The spec IR: what a .block file says, before anything is resolved.

Frozen pydantic models, no torch. Every node keeps the source span it came from so
that later stages (resolve, lower, search) can point errors at the user's text. The
parser builds these; nothing downstream writes back into them.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict


class Node(BaseModel):
    # Schemas are built on first validation only: the parser constructs nodes directly
    # (`model_construct`), which keeps `blockdsl check` instant; tests validate the IR
    # by round-tripping it through `model_validate`. Forward references (`Expr`, `Value`)
    # resolve against this module at that first build, so no `model_rebuild()` here: it
    # would build every schema at import (~30 ms, and pulls in pydantic's plugin loader).
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class Span(Node):
    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


# ---------------------------------------------------------------- expressions
class Num(Node):
    kind: Literal["num"] = "num"
    value: int | float
    span: Span


class Str(Node):
    kind: Literal["str"] = "str"
    value: str
    span: Span


class Bool(Node):
    kind: Literal["bool"] = "bool"
    value: bool
    span: Span


class Name(Node):
    """A variable reference, or a bare symbol (`act=gelu`) when no variable has the name."""

    kind: Literal["name"] = "name"
    id: str
    span: Span


class BinOp(Node):
    kind: Literal["binop"] = "binop"
    op: Literal["+", "-", "*", "/", "//", "%", "**"]
    left: Expr
    right: Expr
    span: Span


class Neg(Node):
    kind: Literal["neg"] = "neg"
    operand: Expr
    span: Span


class Func(Node):
    kind: Literal["func"] = "func"
    name: str
    args: tuple[Expr, ...]
    span: Span


class ChoiceOption(Node):
    """One alternative of a choice: a value, or an int/float range."""

    value: Expr | None = None
    lo: Expr | None = None
    hi: Expr | None = None
    step: Expr | None = None
    log: bool = False
    span: Span


class Choice(Node):
    kind: Literal["choice"] = "choice"
    options: tuple[ChoiceOption, ...]
    span: Span


Expr = Union[Num, Str, Bool, Name, BinOp, Neg, Func, Choice]  # noqa: UP007 - runtime alias


# ---------------------------------------------------------------- calls
class Arg(Node):
    name: str
    value: Value
    span: Span


class Call(Node):
    """`name(arg=value, ...)`: a primitive, stem, head, norm kind, ..."""

    kind: Literal["call"] = "call"
    name: str
    args: tuple[Arg, ...] = ()
    span: Span

    def arg(self, name: str) -> Arg | None:
        return next((a for a in self.args if a.name == name), None)


Value = Union[Expr, Call]  # noqa: UP007


class Assign(Node):
    name: str
    value: Value
    span: Span


# ---------------------------------------------------------------- blocks
class NormOpt(Node):
    placement: str
    kind: str | None = None
    span: Span


class _LineOptions(Node):
    """`norm=...`, `share=...`, `norm_share=...` after a sublayer, slots or pattern line."""

    norm: NormOpt | None = None
    share: str | None = None
    norm_share: str | None = None


class Sublayer(_LineOptions):
    """One line of a block: `label primitive(args) norm=... share=...`.

    `prims` has one call, or several when the slot is a search choice between them.
    """

    label: str
    prims: tuple[Call, ...]
    span: Span
    choice_span: Span | None = None


class Slots(_LineOptions):
    """`slots N of {a() | b() | c()}`: N sublayers s0..s{N-1}, each a choice."""

    count: Expr
    prims: tuple[Call, ...]
    span: Span


class Block(Node):
    name: str
    items: tuple[Sublayer | Slots, ...]
    span: Span


# ---------------------------------------------------------------- layout
class Index(Node):
    start: Expr
    stop: Expr | None = None  # inclusive
    step: Expr | None = None
    span: Span


class Override(Node):
    indices: tuple[Index, ...]
    target: str  # sublayer label
    field: str | None = None  # None: replace the primitive
    value: Value
    span: Span


class Repeat(Node):
    count: Expr
    block: str
    block_span: Span | None = None
    groups: Expr | None = None
    order: str | None = None
    overrides: tuple[Override, ...] = ()
    span: Span


class LetterDef(Node):
    letter: str
    call: Call
    span: Span


class Pattern(_LineOptions):
    """`pattern "AFAM" A=mha() F=mlp() M=topk()`: sugar lowered to blocks."""

    text: str
    letters: tuple[LetterDef, ...]
    span: Span


# ---------------------------------------------------------------- search
# What a space may minimize/maximize or constrain; the language checks the names (so
# `check` catches a typo) and search computes them. Static ones are known from the Plan.
STATIC_METRICS = ("params", "active_params", "flops")
TIMED_METRICS = ("step_time",)
TRAINED_METRICS = ("val_loss", "val_bpb", "val_acc")
METRICS = STATIC_METRICS + TIMED_METRICS + TRAINED_METRICS


class Objective(Node):
    direction: Literal["minimize", "maximize"]
    metric: str
    span: Span


class Constraint(Node):
    metric: str
    op: Literal["<=", ">=", "<", ">"]
    bound: Expr  # may use the name `baseline`
    span: Span


# ---------------------------------------------------------------- models
class Model(Node):
    """A model (or a search space: a model with choices and search directives).

    Statements are kept in order; `extends` is resolved later so a derived model can
    override variables that the base's blocks use.
    """

    name: str
    is_space: bool = False
    extends: str | None = None
    assigns: tuple[Assign, ...] = ()
    blocks: tuple[Block, ...] = ()
    stem: Call | None = None
    head: Call | None = None
    norm: Call | None = None
    final_norm: Call | None = None
    altup: Call | None = None
    layout: tuple[Repeat | Pattern, ...] = ()
    objectives: tuple[Objective, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    baseline: str | None = None
    budget: Call | None = None
    span: Span


class Include(Node):
    path: str
    span: Span


class Module(Node):
    """One parsed file plus, flattened in order, everything it includes."""

    file: str
    assigns: tuple[Assign, ...] = ()
    blocks: tuple[Block, ...] = ()
    models: tuple[Model, ...] = ()
    includes: tuple[Include, ...] = ()
    # Names of the models defined in this file itself (not included): the default
    # model to compile is the last of these.
    own_models: tuple[str, ...] = ()

    def model(self, name: str) -> Model | None:
        # Later definitions shadow earlier ones (an including file may redefine).
        for m in reversed(self.models):
            if m.name == name:
                return m
        return None

