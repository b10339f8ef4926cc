"""Phase 2 of resolve: the layout expanded into units of sublayer instances.

`repeat N BLOCK` (with groups=, order=, per-repeat overrides and slots) and `pattern`
statements become a list of units, each the sublayer instances of one block application,
in stack order. Nothing is bound here but counts and indices: primitives and their
arguments are bound per instance in `instances`, which must see overrides first.
Torch-free.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError, did_you_mean
from blockdsl.lang.expr import Scope
from blockdsl.lang.resolve.merge import name_span

MAX_INSTANCES = 100_000  # sublayer instances in one model


class Instance(NamedTuple):
    """One sublayer instance before binding."""

    block: str  # block name, or "pattern"
    repeat: int  # which repeat of the block (or letter position in the pattern)
    item: ir.Sublayer
    forced: ir.Call | None  # a pattern letter's call (no primitive choice to make)
    overrides: list[ir.Override]  # `at i: label.field = ...` that apply to this repeat
    key_base: str  # parameter group of the primitive, unless share= names one
    norm_base: str  # parameter group prefix of its norms, unless norm_share= names one


def expand_layout(m: dict[str, Any], model: str, scope: Scope) -> list[list[Instance]]:
    """The units of merged model `m`: per block application, its sublayer instances."""
    layout: tuple = m.get("layout", ())
    if not layout:
        raise BlockError(
            f"model '{model}' has no layers", name_span(m["model"]), "add `repeat N BLOCK` or a `pattern`"
        )
    expander = _Expander(m["blocks"], scope)
    for stmt in layout:
        if isinstance(stmt, ir.Pattern):
            expander.pattern(stmt)
        else:
            expander.repeat(stmt)
    return expander.units


class _Expander:
    """The running state of one layout's expansion: units so far and their instance count."""

    def __init__(self, blocks: dict[str, ir.Block], scope: Scope):
        self.blocks = blocks
        self.scope = scope
        self.units: list[list[Instance]] = []
        self.n_inst = 0  # sublayer instances in `units` so far (a running count: no quadratic sums)
        # Two statements that repeat the same block (or two patterns) are distinct layers;
        # only share=, norm_share= and groups= make instances share parameters.
        self.stmt_seen: dict[str, int] = {}

    def prefix(self, name: str) -> str:
        k = self.stmt_seen.get(name, 0)
        self.stmt_seen[name] = k + 1
        return name if k == 0 else f"{name}#{k}"

    def pattern(self, stmt: ir.Pattern) -> None:
        pfx = self.prefix("pattern")
        letters = {ld.letter: ld for ld in stmt.letters}
        text = stmt.text.replace(" ", "")
        if not text:
            raise BlockError("an empty pattern", stmt.span)
        if self.n_inst + len(text) > MAX_INSTANCES:
            raise BlockError(
                f"a pattern of {len(text):,} letters makes more than {MAX_INSTANCES:,} instances",
                stmt.span,
                "is the pattern a typo?",
            )
        self.n_inst += len(text)
        for i, ch in enumerate(text):
            if ch not in letters:
                raise BlockError(
                    f"pattern letter '{ch}' is not bound",
                    stmt.span,
                    f"bind it: {ch}=mlp(...); bound letters: {', '.join(letters) or 'none'}",
                )
            ld = letters[ch]
            sub = ir.Sublayer.model_construct(
                label=ch,
                prims=(ld.call,),
                norm=stmt.norm,
                share=stmt.share,
                norm_share=stmt.norm_share,
                span=ld.span,
            )
            key = f"{pfx}.{i}.{ch}"
            self.units.append([Instance("pattern", i, sub, ld.call, [], key, key)])

    def repeat(self, rep: ir.Repeat) -> None:
        blk = self.blocks.get(rep.block)
        if blk is None:
            raise BlockError(
                f"unknown block '{rep.block}'",
                rep.block_span or rep.span,
                did_you_mean(rep.block, self.blocks),
            )
        pfx = self.prefix(blk.name)
        n, groups, order = self._shape(rep, pfx)
        items = self._items(blk)
        # Checked before overrides expand index ranges: `at 0..N` is as long as the repeat.
        if self.n_inst + n * len(items) > MAX_INSTANCES:
            raise BlockError(
                f"repeat {n:,} x {len(items)} sublayers is more than {MAX_INSTANCES:,} instances",
                rep.count.span,
                "is the repeat count a typo?",
            )
        self.n_inst += n * len(items)
        per_rep = self._overrides(rep, blk, {it.label for it in items}, n)
        for i in range(n):
            copy = i % groups if order == "abab" else i // (n // groups)
            unit = []
            for it in items:
                base = f"{pfx}.{i}.{it.label}" if groups == n else f"{pfx}[{copy}].{it.label}"
                unit.append(Instance(blk.name, i, it, None, per_rep.get(i, {}).get(it.label, []), base, base))
            self.units.append(unit)

    def _shape(self, rep: ir.Repeat, pfx: str) -> tuple[int, int, str]:
        """The repeat count, the number of distinct copies (groups=) and their order."""
        n = self.scope.integer(rep.count, "the repeat count", name=f"{pfx}.repeat")
        groups = n
        if rep.groups is not None:
            groups = self.scope.integer(rep.groups, "groups", name=f"{pfx}.groups")
            if groups > n:
                raise BlockError(
                    f"groups={groups} exceeds the repeat count {n}",
                    rep.groups.span,
                    "groups is the number of distinct copies of the block; at most the repeat count",
                )
        order = rep.order or "abab"
        if order not in ("abab", "aabb"):
            raise BlockError(
                f"order must be abab or aabb, got '{order}'",
                rep.span,
                "abab applies copies 0,1,0,1,...; aabb applies copy 0 n/G times, then copy 1, ...",
            )
        if order == "aabb" and n % groups:
            raise BlockError(
                f"order=aabb needs the repeat count {n} to be a multiple of groups={groups}", rep.span
            )
        return n, groups, order

    def _items(self, blk: ir.Block) -> list[ir.Sublayer]:
        """A block's sublayers, slots expanded to s0..s{N-1}; labels checked unique."""
        items: list[ir.Sublayer] = []
        labels: set[str] = set()
        for it in blk.items:
            if isinstance(it, ir.Slots):
                cnt = self.scope.integer(it.count, "the slots count", 1, 1000, name=f"{blk.name}.slots")
                for j in range(cnt):
                    items.append(
                        ir.Sublayer.model_construct(
                            label=f"s{j}",
                            prims=it.prims,
                            norm=it.norm,
                            share=it.share,
                            norm_share=it.norm_share,
                            span=it.span,
                            choice_span=it.span,
                        )
                    )
            else:
                items.append(it)
        for it in items:
            if it.label in labels:
                raise BlockError(
                    f"block '{blk.name}' has two sublayers named '{it.label}'",
                    it.span,
                    "labels name sublayers for overrides and reports; make them unique",
                )
            labels.add(it.label)
        return items

    def _overrides(
        self, rep: ir.Repeat, blk: ir.Block, labels: set[str], n: int
    ) -> dict[int, dict[str, list[ir.Override]]]:
        """Per repeat index, per sublayer label: the overrides that apply, in spec order."""
        per_rep: dict[int, dict[str, list[ir.Override]]] = {}
        for ov in rep.overrides:
            if ov.target not in labels:
                raise BlockError(
                    f"block '{blk.name}' has no sublayer '{ov.target}'",
                    ov.span,
                    did_you_mean(ov.target, labels),
                )
            for idx in ov.indices:
                for i in _indices(idx, n, self.scope):
                    per_rep.setdefault(i, {}).setdefault(ov.target, []).append(ov)
        return per_rep


def _indices(idx: ir.Index, n: int, scope: Scope) -> list[int]:
    """The repeat indices `idx` (`i`, `i..j`, `i..j step s`, negatives from the end) names."""

    def one(e: ir.Expr) -> int:
        v = scope.eval(e, "index")
        scope.number(v, e)
        if isinstance(v, bool) or not isinstance(v, int):
            raise BlockError(
                f"a repeat index must be an integer, got {v!r}",
                e.span,
                "repeats are numbered 0, 1, ...; negative indices count from the end",
            )
        w = v + n if v < 0 else v
        if not 0 <= w < n:
            raise BlockError(
                f"repeat index {v} is out of range",
                e.span,
                f"this repeat has indices 0..{n - 1} (or -{n}..-1 from the end)",
            )
        return w

    start = one(idx.start)
    if idx.stop is None:
        return [start]
    stop = one(idx.stop)
    if stop < start:
        raise BlockError(f"empty index range {start}..{stop}", idx.span, "write the low end first")
    step = 1 if idx.step is None else scope.integer(idx.step, "a repeat index step")
    return list(range(start, stop + 1, step))
