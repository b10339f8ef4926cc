"""An SVG picture of the block graph: one box per layer instance, in stack order.

Colour says the family (attention, dense FFN, MoE); a tag on the right names the
parameter group, and every group used more than once gets its own colour and a
connector line joining its uses, so sharing is visible at a glance. Plain SVG text, no
dependency.
"""

from __future__ import annotations

from html import escape

from blockdsl.graph import Report, human

_FAMILY = {"attn": "#8ecae6", "ffn": "#ffb703", "moe": "#fb8500"}
_GROUP = ["#e63946", "#2a9d8f", "#6a4c93", "#1d3557", "#f4a261", "#588157", "#bc4749", "#457b9d"]


def to_svg(rep: Report, families: dict[int, str]) -> str:
    row_h, top, width = 26, 70, 760
    rows = rep.rows
    shared = [g for g in dict.fromkeys(r.group for r in rows) if rep.sharing.get(g, 1) > 1]
    colour = {g: _GROUP[i % len(_GROUP)] for i, g in enumerate(shared)}
    height = top + row_h * (len(rows) + 2) + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="15" font-weight="bold">{escape(rep.name)}</text>',
        f'<text x="10" y="40">stored {human(rep.stored_params)} params · active '
        f'{human(rep.active_params_per_token)}/token · {human(rep.flops_per_token)} FLOPs/token '
        f"(seq {rep.seq})</text>",
        f'<rect x="40" y="{top - 22}" width="420" height="18" fill="#eeeeee" stroke="#555"/>',
        f'<text x="48" y="{top - 9}">stem</text>',
    ]
    lane: dict[str, int] = {}
    first_y: dict[str, int] = {}
    for i, r in enumerate(rows):
        y = top + i * row_h
        fill = _FAMILY.get(families.get(r.index, ""), "#dddddd")
        indent = 40 + (r.unit % 2) * 6
        out.append(
            f'<rect x="{indent}" y="{y}" width="420" height="{row_h - 4}" rx="3" '
            f'fill="{fill}" stroke="#333"/>'
        )
        out.append(
            f'<text x="{indent + 8}" y="{y + 15}">{escape(f"{r.block}[{r.repeat}].{r.label}")}: '
            f"{escape(r.prim)}</text>"
        )
        out.append(f'<text x="{indent + 330}" y="{y + 15}">{human(r.flops)}F</text>')
        if r.group in colour:
            c = colour[r.group]
            x = 480 + 14 * lane.setdefault(r.group, len(lane))
            if r.group in first_y:
                out.append(
                    f'<line x1="{x}" y1="{first_y[r.group] + 11}" x2="{x}" y2="{y + 11}" '
                    f'stroke="{c}" stroke-width="2" opacity="0.5"/>'
                )
            else:
                first_y[r.group] = y
            out.append(f'<circle cx="{x}" cy="{y + 11}" r="5" fill="{c}"/>')
            tag = f"shares {r.group.removeprefix('share:')} (×{r.applications})"
            if r.owner:
                out.append(f'<text x="{x + 10}" y="{y + 15}" fill="{c}">{escape(tag)}</text>')
        else:
            out.append(f'<text x="480" y="{y + 15}" fill="#555">{human(r.params)} params</text>')
    y = top + len(rows) * row_h
    out.append(f'<rect x="40" y="{y}" width="420" height="18" fill="#eeeeee" stroke="#555"/>')
    out.append(f'<text x="48" y="{y + 13}">final norm → head</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
