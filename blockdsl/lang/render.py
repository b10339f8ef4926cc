"""Plan -> .block text that compiles on its own to the same Plan.

Used for the `resolved.block` artifact and for writing search winners back out. Every
argument is written explicitly (defaults included), choices are gone, and sharing is
written as `share=` / `norm_share=` names, so the text is independent of the file it
came from. Consecutive identical block applications are folded into `repeat N`.
"""

from __future__ import annotations

import re
from typing import Any

from blockdsl.plan import LayerPlan, Plan
from blockdsl.version import __version__


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v) if v != int(v) or abs(v) >= 1e16 else f"{v:.1f}"
    return str(v)


def _call(name: str, args: dict[str, Any]) -> str:
    return f"{name}(" + ", ".join(f"{k}={_value(v)}" for k, v in args.items()) + ")"


def _ident(key: str) -> str:
    key = key.removeprefix("share:").removeprefix("normshare:")
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_]", "_", key)).strip("_")


def _line(layer: LayerPlan, shared: set[str], default_kind: str) -> str:
    parts = [layer.label, _call(layer.prim, layer.args)]
    kind = layer.norms[0].kind if layer.norms else default_kind
    parts.append(f"norm={layer.placement}" + (f"({kind})" if kind != default_kind else ""))
    if layer.key in shared:
        parts.append(f"share={_ident(layer.key)}")
    if layer.norms and layer.norms[0].key in shared:
        nk = layer.norms[0].key
        parts.append(f"norm_share={_ident(nk[: -1] if nk[-1].isdigit() else nk)}")
    return " ".join(parts)


def render(plan: Plan, name: str | None = None, comment: str | None = None) -> str:
    counts: dict[str, int] = {}
    for layer in plan.layers:
        counts[layer.key] = counts.get(layer.key, 0) + 1
        for n in layer.norms:
            counts[n.key] = counts.get(n.key, 0) + 1
    shared = {k for k, c in counts.items() if c > 1}
    default_kind, default_args = plan.default_norm

    out = [f"# Resolved by blockdsl {__version__} from {plan.file} (model {plan.name})."]
    if comment:
        out += [f"# {c}" for c in comment.splitlines()]
    if plan.assignment:
        out.append("# choices: " + ", ".join(f"{k}={_value(v)}" for k, v in plan.assignment.items()))
    out.append(f"model {name or plan.name} {{")
    out.append(f"  d = {plan.d}")
    out.append(f"  stem {_call(*plan.stem)}")
    out.append(f"  head {_call(*plan.head)}")
    out.append(f"  norm {_call(default_kind, default_args)}")
    fn = plan.final_norm
    out.append(f"  final_norm {_call(fn.kind, fn.args) if fn else 'none()'}")
    if plan.altup:
        out.append(f"  altup {_call('altup', plan.altup)}")

    units: list[list[LayerPlan]] = [[] for _ in range(plan.n_units)]
    for layer in plan.layers:
        units[layer.unit].append(layer)
    bodies = ["\n".join("    " + _line(la, shared, default_kind) for la in u) for u in units]
    blocks: dict[str, str] = {}  # body -> block name
    layout: list[list[Any]] = []
    for u, body in zip(units, bodies):
        if body not in blocks:
            base = re.sub(r"^b\d+_", "", u[0].block) if u else "block"
            blocks[body] = f"b{len(blocks)}_{base}"
            out.append(f"  block {blocks[body]} {{\n{body}\n  }}")
        bname = blocks[body]
        if layout and layout[-1][1] == bname:
            layout[-1][0] += 1
        else:
            layout.append([1, bname])
    out += [f"  repeat {n} {b}" for n, b in layout]
    out.append("}")
    return "\n".join(out) + "\n"
