"""Flatten a model's `extends` chain into one set of statements. Torch-free."""

from __future__ import annotations

from typing import Any

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError, did_you_mean


def merge_model(module: ir.Module, name: str, span: ir.Span | None) -> dict[str, Any]:
    """Flatten a model's `extends` chain: the derived model's statements win.

    A plain dict rather than a new IR node: it is read once by the resolver (and by the
    search for a space's objectives), and absent keys say "never given" without a sentinel.
    """
    chain: list[ir.Model] = []
    seen: set[str] = set()
    cur = module.model(name)
    if cur is None:
        raise BlockError(
            f"no model named '{name}'", span, did_you_mean(name, [m.name for m in module.models])
        )
    while cur is not None:
        if cur.name in seen:
            raise BlockError(
                f"'{cur.name}' extends itself (through {' -> '.join(m.name for m in chain)})",
                cur.span,
            )
        seen.add(cur.name)
        chain.append(cur)
        if cur.extends is None:
            break
        base = module.model(cur.extends)
        if base is None:
            raise BlockError(
                f"'{cur.name}' extends unknown model '{cur.extends}'",
                cur.span,
                did_you_mean(cur.extends, [m.name for m in module.models]),
            )
        cur = base
    merged: dict[str, Any] = {
        "assigns": {a.name: a for a in module.assigns},
        "blocks": {b.name: b for b in module.blocks},
    }
    for m in reversed(chain):
        merged["assigns"].update({a.name: a for a in m.assigns})
        merged["blocks"].update({b.name: b for b in m.blocks})
        for key in ("stem", "head", "norm", "final_norm", "altup", "baseline", "budget"):
            if getattr(m, key) is not None:
                merged[key] = getattr(m, key)
        for key in ("layout", "objectives", "constraints"):
            if getattr(m, key):
                merged[key] = getattr(m, key)
    merged["model"] = chain[0]
    return merged


def merged(module: ir.Module, name: str) -> dict[str, Any]:
    """A model's (or space's) statements with its `extends` chain applied.

    Keys: assigns, blocks, stem, head, norm, final_norm, altup, layout, and for spaces
    objectives, constraints, baseline, budget (absent keys were never given).
    """
    return merge_model(module, name, None)


def name_span(m: ir.Model) -> ir.Span:
    """The `model NAME` words of a model's first line: where whole-model errors point."""
    kw = "space " if m.is_space else "model "
    s = m.span
    return ir.Span.model_construct(
        file=s.file, line=s.line, col=s.col, end_line=s.line, end_col=s.col + len(kw) + len(m.name)
    )
