"""`blockdsl compare A.block B.block ...`: train several models under one budget and data,
several seeds each, and report them side by side with their seed noise.

Thin: arguments to a `CompareConfig`, `blockdsl.compare.compare`, and the rich table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from blockdsl.cli.train import _NONNEG_FLOAT, _NONNEG_INT, _POS_FLOAT, _POS_INT, _SEED

DEFAULT_STEPS = 200


def register(subparsers: Any) -> None:
    """Add the `compare` subcommand to the main parser."""
    from blockdsl.cli import common as C

    p = subparsers.add_parser(
        "compare", help="train several models under one budget, several seeds each, "
        "and compare them with their seed noise",
        description=(
            "Train every model the given files define (or the ones --model names) with the "
            "same data, hyperparameters and budget, over --seeds seeds each; report "
            "parameters, FLOPs, paired step time, final validation loss as mean ± std, and "
            "which differences lie outside the seed noise. Writes results.json, loss.png and "
            "summary.png into --out. Rerunning the same command resumes it."),
    )
    p.add_argument("specs", nargs="+", metavar="SPEC", help=".block files")
    p.add_argument("--model", action="append", default=None, metavar="NAME",
                   help="compare only this model (repeat for several; default: every "
                   "model the files define themselves)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_POS_INT, default=None,
                        help=f"optimizer steps per run (default {DEFAULT_STEPS})")
    budget.add_argument("--tokens", type=_POS_INT, default=None,
                        help="tokens per run (images for classifiers)")
    budget.add_argument("--seconds", type=_POS_FLOAT, default=None,
                        help="training seconds per run (not reproducible from the seeds)")
    p.add_argument("--seeds", type=_POS_INT, default=3, help="seeds per model (default 3)")
    p.add_argument("--seed", type=_SEED, default=0, help="first seed (default 0)")
    p.add_argument("--workers", type=_POS_INT, default=1,
                   help="runs trained at once, each in its own process (default 1)")
    p.add_argument("--threads", type=_POS_INT, default=None,
                   help="torch threads per run (default: cores / workers); numbers repeat "
                   "exactly on the same thread count")
    p.add_argument("--data", default=None, help="as for `blockdsl train` (default: its default)")
    C.add_shape(p, batch_default=16, batch_help="sequences/images per step (default 16)",
                seq_help="training context (default: the spec's)", kind=_POS_INT)
    p.add_argument("--lr", type=_POS_FLOAT, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--warmup", type=_NONNEG_INT, default=20, help="warm-up steps (default 20)")
    p.add_argument("--weight-decay", type=_NONNEG_FLOAT, default=0.1)
    p.add_argument("--eval-every", type=_POS_INT, default=50,
                   help="steps between evaluations and checkpoints (default 50)")
    p.add_argument("--eval-batches", type=_NONNEG_INT, default=16,
                   help="validation batches per evaluation (0 = the whole split; default 16)")
    p.add_argument("--timing-steps", type=_POS_INT, default=6,
                   help="paired steps timed per model (default 6)")
    p.add_argument("--tolerance", type=_NONNEG_FLOAT, default=5.0,
                   help="percent by which sizes/compute may differ before a warning (default 5)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default runs/compare/<model>-vs-<model>...)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="train every run with a compiled step, as `train --compile` "
                   "(default: per device, off on CPU); step times are timed eagerly")
    C.add_torch(p, device_default="cpu", device_help="cpu (default) or cuda, cuda:1, ...")
    C.add_output(p, quiet_help="no progress lines or table (the files are still written)",
                 json_help="print results.json on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from blockdsl.compare import CompareConfig, compare, entrants

    steps = args.steps if args.steps or args.tokens or args.seconds else DEFAULT_STEPS
    out = args.out
    if out is None:
        labels = [e.label for e in entrants(args.specs, args.model)]
        out = Path("runs/compare") / "-vs-".join(labels)[:120]
    cfg = CompareConfig(
        steps=steps, tokens=args.tokens, seconds=args.seconds, seeds=args.seeds,
        first_seed=args.seed, workers=args.workers, threads=args.threads,
        data=str(args.data) if args.data else None, batch_size=args.batch, seq_len=args.seq,
        lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
        precision=args.precision, eval_every=args.eval_every,
        eval_batches=args.eval_batches or None, device=args.device,
        timing_steps=args.timing_steps, tolerance=args.tolerance / 100, out=out,
        compile=args.compile,
    )
    quiet = args.quiet or args.json

    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    done = compare(args.specs, args.model, cfg, say=say)
    if args.json:
        print(json.dumps(done.results))
    elif not args.quiet:
        _print(done)
    return 0


def _fmt_loss(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    if s["n"] < 2:
        return f"{s['mean']:.4f} (1 seed)"
    return f"{s['mean']:.4f} ± {s['std']:.4f}  [{s['min']:.4f}..{s['max']:.4f}] n={s['n']}"


def _print(done: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from blockdsl.graph import human

    res = done.results
    rows = res["entrants"]
    ref = rows[0]["label"]
    vs_ref = {d["b"]: d for d in res["differences"] if d["a"] == ref}
    b = res["budget"]
    t = Table(title=f"compare: {b['value']:g} {b['kind']} per run, seeds {res['seeds']}",
              title_justify="left")
    for col in ("model", "stored", "active/tok", "FLOPs/tok", "step (paired)", "tok/s",
                "val loss: mean ± std [range]", f"Δ vs {ref}", "outside noise?"):
        t.add_column(col, justify="left" if col in ("model", "outside noise?") else "right")
    for r in rows:
        d = vs_ref.get(r["label"])
        verdict = "-" if d is None else (
            ("[bold]yes: better[/]" if d["diff"] < 0 else "[bold]yes: worse[/]")
            if d["separated"] else "no") + f" ({d['wins']}/{d['paired']} seeds lower)"
        if d is None:
            verdict = "(reference)"
        step = r.get("step_seconds")
        t.add_row(r["label"], human(r["stored_params"]), human(r["active_params"]),
                  human(r["flops_per_token"]),
                  "-" if step is None else f"{step * 1000:.1f} ms",
                  "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}",
                  _fmt_loss(r["val_loss"]),
                  "" if d is None else f"{d['diff']:+.4f}", verdict)
    con = Console(width=None if Console().is_terminal else 200)
    con.print(t)
    for pair in res["differences"]:
        if pair["a"] != ref and pair["separated"]:
            con.print(f"  also outside noise: {pair['b']} - {pair['a']} = {pair['diff']:+.4f}")
    for w in res["warnings"]:
        con.print(f"[bold red]warning:[/] {w}")
    if not res["complete"]:
        con.print("[yellow]not every run finished: the table covers the finished ones[/]")
    tm = res["timing"]
    con.print(f"step time: {tm.get('timed_steps')} paired steps per model, "
              f"{tm.get('threads')} thread(s), load average {tm.get('loadavg_before', ['?'])[0]}")
    con.print(f"files: {done.results_path}, {done.loss_plot}, {done.summary_plot}")
