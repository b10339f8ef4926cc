"""The registry's types and its one table: what a primitive is, and how one is added.

A `Primitive` is everything the pipeline needs to know about one layer kind, in one
entry: its argument schema (defaults written here and nowhere else), its checks, its
parameter/active/FLOP/memory formulas, its family (which carries the picture's name and
colour), how it lowers to a module (`Lowering`), which argument names its implementation
and how that one is tuned (`Tunable`), and whether it reads the peri-norm `x_norm=` input.
Before, adding a primitive touched six files; now it is one `register(...)` call.

The small value types (Ctx, BuildEnv, Family, Lowering, Tunable) are NamedTuples rather
than frozen dataclasses: equally immutable and typed, and a tenth of the cost to define
(about 0.4 ms each for a frozen dataclass), which `blockdsl check` pays at every start.

Torch-free at import: a lowering names its module by "package.module:Class" (or holds a
class its registrant already imported), and the import happens only when a model is
built, so `blockdsl check` never loads torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple


class ArgError(ValueError):
    """A bad argument value; `arg` names it so the caller can point at its text."""

    def __init__(self, message: str, arg: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.arg = arg
        self.hint = hint


@dataclass(frozen=True)
class ArgSpec:
    type: str  # "int", "float", "bool", "enum", "optfloat"
    default: Any = None  # a value, or a callable(ctx, args) -> value; REQUIRED if missing
    values: tuple[str, ...] = ()
    doc: str = ""


REQUIRED = object()


class Ctx(NamedTuple):
    """What a primitive may read from its model: width, sequence length, task."""

    d: int
    seq: int
    causal: bool
    rope: bool
    n_applications: int = 1


class BuildEnv(NamedTuple):
    """What a lowering may read besides the layer's arguments.

    `device` is a torch.device, typed Any so this module needs no torch. `n_applications`
    counts the block applications of the whole stack (MoEUT scales its init by it).
    """

    d: int
    n_applications: int
    device: Any
    precision: str
    seq: int


class Family(NamedTuple):
    """A kind of sub-layer: its key in the report's breakdown, its legend text and colour.

    Held by the registry so the report and the picture never list families themselves.
    """

    name: str
    title: str
    colour: str


class Lowering(NamedTuple):
    """How a layer becomes a module: every schema argument passed by keyword, declaratively.

    `target` is "package.module:Class" (imported when a model is built) or a callable.
    `kwargs` maps each schema argument to the module's keyword; `register` rejects an entry
    whose map misses a schema argument, so the schema's default is the one a spec gets and
    a module's own keyword defaults (kept for direct PyTorch use, as in tests/nn) are
    never reached from a spec. `env` maps module keywords to `BuildEnv` fields ("d",
    "n_applications"). `prepare` rewrites values lowering decides (an `auto` kernel to a
    concrete one) before they are passed.
    """

    target: str | Callable[..., Any]
    kwargs: dict[str, str]
    env: Mapping[str, str] = MappingProxyType({"d": "d"})  # read-only: one shared default
    prepare: Callable[[dict[str, Any], BuildEnv], dict[str, Any]] | None = None

    def module_class(self) -> Callable[..., Any]:
        if callable(self.target):
            return self.target
        mod, _, name = self.target.partition(":")
        return getattr(importlib.import_module(mod), name)

    def build(self, args: dict[str, Any], env: BuildEnv) -> Any:
        a = self.prepare(dict(args), env) if self.prepare else dict(args)
        kw = {self.kwargs[k]: v for k, v in a.items() if k in self.kwargs}
        kw.update({k: getattr(env, f) for k, f in self.env.items()})
        return self.module_class()(**kw)


class Tunable(NamedTuple):
    """The argument that names a primitive's implementation, measured by `compile --tune`.

    `candidates` are raced against `reference` (the numerical ground truth). `default`
    is the rule lowering follows with no measurement: (args, env) -> a candidate name;
    tune records it to compare the winners with.
    """

    arg: str
    candidates: tuple[str, ...]
    reference: str
    default: Callable[[dict[str, Any], BuildEnv], str]


@dataclass(frozen=True)
class Primitive:
    """One layer kind. `args` is its schema (the language fills defaults from it and checks
    values with `check`); `params`/`active`/`flops` count it from (Ctx, args) alone, and
    must match the parameter layout of the module `lowering` builds (test_accounting
    asserts it per shipped spec); the rest is optional: `tunable`, `x_norm`, `memory`."""

    name: str
    family: str  # a key of FAMILIES: "attn" | "ffn" | "moe" | one a registrant added
    args: dict[str, ArgSpec]
    check: Callable[[Ctx, dict[str, Any]], None]
    params: Callable[[Ctx, dict[str, Any]], int]
    active: Callable[[Ctx, dict[str, Any]], float]
    flops: Callable[[Ctx, dict[str, Any]], float]
    doc: str = ""
    lowering: Lowering | None = None
    tunable: Tunable | None = None
    # Whether the module's forward takes `x_norm=` (MoEUT's peri-norm: the norm feeds only
    # the projections before a softmax/sigmoid). Without it, `peri` gets no norm.
    x_norm: bool = False
    # (MemCtx, args) -> (bytes kept for backward per application, bytes held while it
    # runs): `graph.estimate_memory`'s term for this layer (see primitives/memory.py).
    # None counts the layer's input only.
    memory: Callable[[Any, dict[str, Any]], tuple[int, int]] | None = None
    # "package.module:function" that writes the built module as standalone PyTorch source
    # (`blockdsl export --format pytorch`; see blockdsl/export/codegen/); imported only
    # when exporting. None: that format names the primitive and suggests pt2.
    codegen: str | None = None

    def build(self, args: dict[str, Any], env: BuildEnv) -> Any:
        if self.lowering is None:
            raise ValueError(f"primitive {self.name!r} has no lowering")
        return self.lowering.build(args, env)


# The registry. `PRIMITIVES` is the name the resolver and the report have always read.
PRIMITIVES: dict[str, Primitive] = {}
FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def register(prim: Primitive, replace: bool = False) -> Primitive:
    """Add `prim` to the registry; the language, report, lowering and tuner then know it.

    Rejected here rather than at first use: a duplicate name (unless `replace`), a family
    no one registered, a lowering that does not pass every schema argument, and a tunable
    argument that is not in the schema.
    """
    if prim.name in PRIMITIVES and not replace:
        raise ValueError(f"primitive {prim.name!r} is already registered")
    if prim.family not in FAMILIES:
        raise ValueError(f"primitive {prim.name!r}: unknown family {prim.family!r}; "
                         f"register_family() it first (known: {', '.join(FAMILIES)})")
    if prim.lowering is not None:
        missing = [k for k in prim.args if k not in prim.lowering.kwargs]
        if missing:
            raise ValueError(f"primitive {prim.name!r}: its lowering does not pass "
                             f"{', '.join(missing)}")
    if prim.tunable is not None and prim.tunable.arg not in prim.args:
        raise ValueError(f"primitive {prim.name!r}: tunable argument {prim.tunable.arg!r} "
                         "is not in its schema")
    PRIMITIVES[prim.name] = prim
    return prim


def unregister(name: str) -> None:
    PRIMITIVES.pop(name, None)


def get(name: str) -> Primitive:
    try:
        return PRIMITIVES[name]
    except KeyError:
        raise KeyError(f"no primitive {name!r}; registered: {', '.join(PRIMITIVES)}") from None


def tunable(name: str) -> Tunable | None:
    """The tunable implementation argument of primitive `name`, or None (unknown or fixed)."""
    prim = PRIMITIVES.get(name)
    return prim.tunable if prim is not None else None
