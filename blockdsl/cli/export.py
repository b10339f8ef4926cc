"""`blockdsl export SPEC_OR_RUN --format {pytorch,hf,pt2} --out DIR`: a model for other tools.

Thin: the work is in `blockdsl.export`; this maps flags, turns what a user can fix into
one `error:` line, and lists what it wrote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

FORMATS = ("pytorch", "hf", "pt2")


def register(subparsers: Any) -> None:
    """Add the `export` subcommand to the main parser."""
    p = subparsers.add_parser(
        "export",
        help="write a spec's or a trained run's model for use without blockdsl",
        description=(
            "Export a trained run (a folder written by `blockdsl train`, or one of its "
            "ckpt-<step> folders) or a spec (fresh weights, --seed) into --out: "
            "pytorch: a standalone model.py that needs only torch, plus model.safetensors; "
            "hf: a Hugging Face folder (config.json, modeling code, safetensors) for "
            "from_pretrained(DIR, trust_remote_code=True); pt2: torch.export.save of the "
            "exported program (dynamic batch and sequence length). Every format also writes "
            "resolved.block."
        ),
    )
    p.add_argument("source", metavar="SPEC_OR_RUN", help="a .block file or a run folder")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the fresh weights when exporting a spec (default 0)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blockdsl.export import ExportError, export, load_source
    from blockdsl.runs import RunError

    src = Path(args.source)
    if not src.exists():
        print(f"error: {src} does not exist\n  hint: give a .block spec or a run folder "
              "written by `blockdsl train`", file=sys.stderr)
        return 1
    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 1
    try:
        model = load_source(src, seed=args.seed)
        written = export(model, args.fmt, args.out)
    except (ExportError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        for path in written:
            print(f"wrote {path}")
    return 0
