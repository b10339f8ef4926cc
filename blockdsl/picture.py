"""An SVG picture of the block graph: one box per layer instance, in stack order.

What a reader needs to understand a block without opening the spec, each in its own
column so the eye can run down it: the layer and its primitive; where its norm sits and
which kind (`pre LN`, `peri RMS`, `sandwich LN x2`, `none`), since placement is the
difference between many published blocks; for routed layers the expert count and how
many a token uses (`64 exp, k=2`, or the capacity factor for expert choice); the
parameters the box stores and its forward FLOPs per token, both in 3-significant-digit
units (`12.3K`, `5.32 MFLOP`) because a bare `5.32MF` reads as a typo.

Colour says the family (attention, dense FFN, MoE, or any a registrant added: name and
colour come from the registry), explained by a legend under the title. Every parameter
group used more than once gets its own colour and a connector line joining its uses, so
sharing is visible at a glance; only the first use (the owner) counts the group's
parameters, the others say `shared` (`shared +64` when that use has a norm of its own),
so the params column sums to the stored total. Plain SVG text, no dependency.
"""

from __future__ import annotations

from html import escape
from typing import Any

from blockdsl.graph import Report
from blockdsl.primitives import FAMILIES

# A layer whose family no one registered (a Plan from elsewhere) is drawn grey as "other".
_OTHER = "#dddddd"
_GROUP = ["#e63946", "#2a9d8f", "#6a4c93", "#1d3557", "#f4a261", "#588157", "#bc4749", "#457b9d"]
_NORM_ABBR = {"layernorm": "LN", "rmsnorm": "RMS"}

# Column x offsets inside a layer box (monospace 12 px: about 7.2 px a character).
_BOX_X, _BOX_W = 40, 700
_COL = {"layer": 8, "norm": 268, "experts": 372, "params": 512, "flops": 604}


def si(n: float) -> str:
    """3 significant digits with a K/M/G/T suffix: 12345 -> '12.3K', 999 -> '999'.

    Three digits rather than `graph.human`'s two decimals: a picture's column of
    numbers reads at a glance when every entry has the same precision.
    """
    n = float(n)
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div * 0.9995:  # 999,950 rounds to 1.00M, not 1000K
            v = n / div
            digits = 2 if abs(v) < 9.995 else 1 if abs(v) < 99.95 else 0
            return f"{v:.{digits}f}{unit}"
    return f"{n:.3g}" if n != int(n) else f"{int(n)}"


def flops_text(n: float) -> str:
    """5.32e6 -> '5.32 MFLOP' (the unit spelled out: `5.32MF` was read as a typo)."""
    s = si(n)
    return f"{s[:-1]} {s[-1]}FLOP" if s[-1].isalpha() else f"{s} FLOP"


def norm_text(layer: Any) -> str:
    """Placement and kind of a layer's norms: 'pre LN', 'sandwich RMS x2', 'none'."""
    if not layer.norms:
        return "none" if layer.placement == "none" else f"{layer.placement} (none)"
    kinds = dict.fromkeys(_NORM_ABBR.get(n.kind, n.kind) for n in layer.norms)
    times = f" x{len(layer.norms)}" if len(layer.norms) > 1 else ""
    return f"{layer.placement} {'/'.join(kinds)}{times}"


def experts_text(args: dict[str, Any]) -> str:
    """'64 exp, k=2' for top-k routing, 'cf=2' for expert choice; '' when not routed."""
    e = args.get("experts")
    if not e or e <= 1:
        return ""
    if "k" in args:
        how = f"k={args['k']}"
    elif args.get("capacity_factor") is not None:
        how = f"cf={args['capacity_factor']:g}"
    else:
        how = ""
    return f"{e} exp, {how}" if how else f"{e} exp"


def to_svg(rep: Report, families: dict[int, str] | None = None, plan: Any = None) -> str:
    """The picture of `rep`; `plan` (the resolved Plan) adds norm and expert columns and
    the family colours (`families`, layer index -> family, is the older way to pass them)."""
    layers = {layer.index: layer for layer in plan.layers} if plan is not None else {}
    if families is None:
        families = {i: layer.family for i, layer in layers.items()}
    row_h = 26
    rows = rep.rows
    shared = [g for g in dict.fromkeys(r.group for r in rows) if rep.sharing.get(g, 1) > 1]
    colour = {g: _GROUP[i % len(_GROUP)] for i, g in enumerate(shared)}
    tags = [f"{g.removeprefix('share:')} used ×{rep.sharing[g]}" for g in shared]
    width = max(860, _BOX_X + _BOX_W + 26 + 14 * len(shared)
                + int(7.2 * max(map(len, tags), default=0)) + 20)
    top = 136  # title, totals, legend, column headers
    height = top + row_h * (len(rows) + 1) + 40
    x0 = _BOX_X
    bd = rep.breakdown
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(rep.name)}</text>',
        f'<text x="10" y="40">{si(rep.stored_params)} params stored · '
        f'{si(rep.active_params_per_token)} active per token · '
        f"{flops_text(rep.flops_per_token)}/token forward (seq {rep.seq}) · "
        f"{rep.layers} layers in {rep.units} block applications</text>",
    ]
    out += _legend({families.get(r.index, "") for r in rows})
    hy = top - 14
    heads = {"layer": "layer: primitive", "norm": "norm", "experts": "experts",
             "params": "params", "flops": "FLOPs/token"}
    for col, text in heads.items():
        out.append(f'<text x="{x0 + _COL[col]}" y="{hy}" font-weight="bold">{text}</text>')
    # stem
    sy = top - 4
    out.append(f'<rect x="{x0}" y="{sy}" width="{_BOX_W}" height="18" fill="#eeeeee" '
               'stroke="#555"/>')
    out.append(f'<text x="{x0 + 8}" y="{sy + 13}">stem{_io_text(plan, "stem")}</text>')
    out.append(f'<text x="{x0 + _COL["params"]}" y="{sy + 13}">{si(bd.get("stem", 0))}</text>')
    lane: dict[str, int] = {}
    first_y: dict[str, int] = {}
    top += 18
    for i, r in enumerate(rows):
        y = top + i * row_h
        fam = FAMILIES.get(families.get(r.index, ""))
        fill = fam.colour if fam is not None else _OTHER
        indent = x0 + (r.unit % 2) * 6  # alternate block applications step in and out
        layer = layers.get(r.index)
        out.append(
            f'<rect x="{indent}" y="{y}" width="{_BOX_W - 6}" height="{row_h - 4}" rx="3" '
            f'fill="{fill}" stroke="#333"/>'
        )
        ty = y + 15
        out += _columns(r, layer, indent, ty)
        if r.group in colour:
            c = colour[r.group]
            lx = x0 + _BOX_W + 20 + 14 * lane.setdefault(r.group, len(lane))
            if r.group in first_y:
                out.append(
                    f'<line x1="{lx}" y1="{first_y[r.group] + 11}" x2="{lx}" y2="{y + 11}" '
                    f'stroke="{c}" stroke-width="2" opacity="0.5"/>'
                )
            else:
                first_y[r.group] = y
            out.append(f'<circle cx="{lx}" cy="{y + 11}" r="5" fill="{c}"/>')
            if r.owner:
                tag = f"{r.group.removeprefix('share:')} used ×{r.applications}"
                tx = x0 + _BOX_W + 20 + 14 * len(shared) + 6
                out.append(f'<text x="{tx}" y="{ty}" fill="{c}">{escape(tag)}</text>')
    y = top + len(rows) * row_h
    fin = plan.final_norm.kind if plan is not None and plan.final_norm else None
    end = (f"final {_NORM_ABBR.get(fin, fin)} → head" if fin else "head") + _io_text(plan, "head")
    out.append(f'<rect x="{x0}" y="{y}" width="{_BOX_W}" height="18" fill="#eeeeee" '
               'stroke="#555"/>')
    out.append(f'<text x="{x0 + 8}" y="{y + 13}">{escape(end)}</text>')
    end_params = bd.get("head", 0) + bd.get("final_norm", 0)
    out.append(f'<text x="{x0 + _COL["params"]}" y="{y + 13}">{si(end_params)}</text>')
    if plan is not None and plan.altup:
        out.append(f'<text x="{x0}" y="{y + 36}" fill="#333">{_altup_text(plan)}: '
                   f'{si(bd.get("altup", 0))} mixing params</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _legend(present: set[str]) -> list[str]:
    """One swatch per registered family (and "other" for a family no one registered), then
    what the sharing marks mean."""
    x = 10
    out = [f'<text x="{x}" y="64" fill="#333">colour:</text>']
    x += 62
    for fam, family in FAMILIES.items():
        name = family.title + ("" if fam in present else " (none here)")
        out.append(f'<rect x="{x}" y="53" width="14" height="14" fill="{family.colour}" '
                   f'stroke="#333"/><text x="{x + 20}" y="64">{escape(name)}</text>')
        x += 20 + 7.2 * len(name) + 18
    if present - set(FAMILIES):
        out.append(f'<rect x="{x}" y="53" width="14" height="14" fill="{_OTHER}" stroke="#333"/>'
                   f'<text x="{x + 20}" y="64">other</text>')
    out.append(
        '<text x="10" y="84" fill="#333">sharing: a dot and line of one colour join the '
        "uses of one parameter group; its first use counts the params</text>"
    )
    return out


def _columns(r: Any, layer: Any, indent: int, ty: int) -> list[str]:
    """A layer box's text: label, norm, experts (with a Plan), params, FLOPs."""
    label = f"{r.block}[{r.repeat}].{r.label}: {r.prim}"
    if len(label) > 35:
        label = label[:34] + "…"
    out = [f'<text x="{indent + _COL["layer"]}" y="{ty}">{escape(label)}</text>']
    if layer is not None:
        out.append(f'<text x="{indent + _COL["norm"]}" y="{ty}">'
                   f"{escape(norm_text(layer))}</text>")
        ex = experts_text(layer.args)
        if ex:
            out.append(f'<text x="{indent + _COL["experts"]}" y="{ty}" '
                       f'font-weight="bold">{escape(ex)}</text>')
    # a later use of a shared group may still own its norm (ALBERT keeps one per use)
    ptext = si(r.params) if r.owner else "shared" + (f" +{si(r.params)}" if r.params else "")
    out.append(f'<text x="{indent + _COL["params"]}" y="{ty}">{ptext}</text>')
    out.append(f'<text x="{indent + _COL["flops"]}" y="{ty}">{flops_text(r.flops)}</text>')
    return out


def _altup_text(plan: Any) -> str:
    if plan is None or not plan.altup:
        return ""
    a = plan.altup
    return escape(f"AltUp K={a['k']} ({a['mode']}, {a['selection']}) around each block application")


# What the picture says of a stem or head beyond its kind, by kind.
_IO_DETAIL: dict[str, Any] = {
    "tokens": lambda a: f"tokens: vocab {a['vocab']}, pos {a['pos']}",
    "lm": lambda a: "lm, tied" if a.get("tie") else "lm",
}


def _io_text(plan: Any, part: str) -> str:
    """" (kind, details)" of the plan's stem or head (`part`), or "" without a plan."""
    if plan is None:
        return ""
    kind, a = getattr(plan, part)
    return escape(f" ({_IO_DETAIL[kind](a) if kind in _IO_DETAIL else kind})")
