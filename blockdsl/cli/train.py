"""`blockdsl train SPEC`: build the spec, train it on real data, print a summary.

Thin on purpose: everything a Python user needs is `blockdsl.train.train`; this module
only maps flags to a `TrainConfig` and renders the result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

DEFAULT_STEPS = 300


def _number(kind: type, low: float, inclusive: bool) -> Any:
    """An argparse type: a finite `kind` above `low` (or at it when inclusive).

    A bad value is a usage error, reported by argparse as `argument --lr: ...` (exit 2),
    as `compile --batch` does: before anything is built or written. NaN and infinity are
    refused by name, since `float("nan")` parses and then fails every comparison.
    """
    bound = f">= {low:g}" if inclusive else f"> {low:g}"
    noun = "an integer" if kind is int else "a finite number"

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} {bound}, got {text!r}") from None
        if not math.isfinite(v) or v < low or (v == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {noun} {bound}, got {text!r}")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


_POS_INT = _number(int, 0, inclusive=False)
_NONNEG_INT = _number(int, 0, inclusive=True)
_POS_FLOAT = _number(float, 0.0, inclusive=False)
_NONNEG_FLOAT = _number(float, 0.0, inclusive=True)


def _SEED(text: str) -> int:  # noqa: N802 - an argparse type, named like the others
    """0..2**63-1: torch's generators take a 64-bit seed; a negative or larger one was an
    internal error deep in seeding."""
    v = _NONNEG_INT(text)
    if v >= 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63-1, got {text!r}")
    return v


def register(subparsers: Any) -> None:
    """Add the `train` subcommand to the main parser."""
    p = subparsers.add_parser(
        "train",
        help="train a spec on real data (byte-level text or digits by default)",
        description=(
            "Train the model a .block spec describes. Language models read byte-level text "
            "(default: the Python standard library's own sources), classifiers read "
            "scikit-learn's digits or a folder of class subfolders. Writes metrics.jsonl, "
            "loss.png and checkpoints into --out. Under torchrun every rank takes a shard."
        ),
    )
    from blockdsl.cli import common as C

    C.add_spec(p)
    p.add_argument("--data", default=None,
                   help="text file or folder (LM, byte-level), token ids (a .bin, or a folder "
                   "with train.bin/val.bin from `blockdsl tokenize`), or image folder "
                   "root/<class>/<img>")
    p.add_argument("--data-dtype", choices=("uint16", "uint32"), default=None,
                   help="id type of a .bin without meta.json (nanoGPT writes uint16)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_POS_INT, default=None,
                        help=f"optimizer steps (default {DEFAULT_STEPS})")
    budget.add_argument("--tokens", type=_POS_INT, default=None,
                        help="tokens to train on (images for classifiers)")
    budget.add_argument("--seconds", type=_POS_FLOAT, default=None,
                        help="training wall-clock seconds (evaluation excluded)")
    C.add_shape(p, batch_default=16, batch_help="global sequences/images per step (default 16)",
                seq_help="training context (default: the spec's; may only be shorter)",
                kind=_POS_INT)
    p.add_argument("--accum", type=_POS_INT, default=1, help="gradient accumulation micro-steps")
    p.add_argument("--lr", type=_POS_FLOAT, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--warmup", type=_NONNEG_INT, default=20, help="linear warm-up steps (default 20)")
    p.add_argument("--weight-decay", type=_NONNEG_FLOAT, default=0.1)
    p.add_argument("--eval-every", type=_POS_INT, default=50, help="steps between evaluations")
    p.add_argument("--eval-batches", type=_NONNEG_INT, default=8,
                   help="validation batches per evaluation (0 = the whole split)")
    p.add_argument("--seed", type=_SEED, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (default runs/<model>, numbered if taken; with --resume "
                   "runs/<model> itself)")
    p.add_argument("--ckpt-every", type=_POS_INT, default=None, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from --out's latest checkpoint")
    C.add_torch(p)
    C.add_output(p, quiet_help="no progress bar, messages or summary table",
                 json_help="print the result (val metrics, steps, tokens/s, files) as one JSON "
                 "object on stdout")
    C.alias(p, "--no-live", "quiet", action="store_true")
    p.add_argument("--force", action="store_true",
                   help="start even when the estimated memory exceeds what the device has")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files (the metrics.jsonl scalars) to "
                   "<out>/tb; needs pip install 'blockdsl[tensorboard]'")
    from blockdsl.names import SHARDING

    p.add_argument("--shard", choices=SHARDING, default="none",
                   help="fsdp: shard parameters, gradients and optimizer state over the "
                   "processes (FSDP2); none: every process holds the whole model")
    p.add_argument("--ep", type=_POS_INT, default=1,
                   help="expert parallelism: split each routed layer's experts over this "
                   "many processes (must divide the process count)")
    p.add_argument("--nproc", type=_POS_INT, default=None,
                   help="launch this many local processes with torchrun (one per GPU when "
                   "there are GPUs); across machines run torchrun yourself (see README)")
    p.add_argument("--export-checkpoint", type=Path, default=None, metavar="DEST",
                   help="train nothing: convert --out's latest sharded checkpoint (from "
                   "--shard/--ep) into DEST/ckpt-<step>, the single-file format")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the whole model (fullgraph) for the training step; "
                   "default: per device, as benchmarks/compile.py measured (off on CPU)")
    p.set_defaults(func=run)


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def run(args: argparse.Namespace) -> int:
    """Build, train, print the summary; a TrainError prints as one line and exits 1."""
    if args.nproc is not None:
        return _launch(args)
    if args.export_checkpoint is not None:
        return _export(args)
    from blockdsl.train import TrainConfig, TrainError
    from blockdsl.train.spec import train_spec

    try:
        cfg = TrainConfig(
            data=args.data, steps=args.steps, tokens=args.tokens, seconds=args.seconds,
            batch_size=args.batch, seq_len=args.seq, accum=args.accum, lr=args.lr,
            warmup=args.warmup, weight_decay=args.weight_decay, precision=args.precision,
            eval_every=args.eval_every, eval_batches=args.eval_batches or None, seed=args.seed,
            out=args.out, resume=args.resume, ckpt_every=args.ckpt_every, device=args.device,
            quiet=args.quiet or args.json, shard=args.shard, ep=args.ep,
            compile=args.compile,
        )
        done = train_spec(args.spec, args.model, cfg, default_steps=DEFAULT_STEPS,
                          data_dtype=args.data_dtype, force=args.force,
                          tensorboard=args.tensorboard)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result, out = done.result, done.out
    if int(os.environ.get("RANK", "0")) == 0:
        if args.json:
            print(json.dumps(_json_summary(result), default=str))
        elif args.quiet:
            pass
        elif result.stopped_by == "finished":
            val = result.val.get("val_loss")
            print(f"already finished: {out} reached its budget at step {result.steps}"
                  + (f" (val loss {val:.4f})" if val is not None else "")
                  + "; nothing was trained or written (raise --steps, --tokens or --seconds "
                  "to train further)")
        else:
            _print_summary(result, done.task)
    return 130 if result.stopped_by == "interrupt" else 0


def _export(args: argparse.Namespace) -> int:
    """`--export-checkpoint DEST`: a sharded checkpoint of --out as a single-file one."""
    import blockdsl
    from blockdsl.train import TrainError
    from blockdsl.train.checkpoint import latest_checkpoint, to_single_file

    if args.out is None:
        print("error: --export-checkpoint needs --out, the run folder holding the sharded "
              "checkpoint", file=sys.stderr)
        return 2
    try:
        src = latest_checkpoint(args.out)
        if src is None or not (src / "dcp").is_dir():
            raise TrainError(f"{args.out} has no sharded checkpoint ('latest' naming a folder "
                             "with dcp/); single-file checkpoints need no conversion")
        model = blockdsl.build(args.spec, args.model, device="cpu")
        dest = to_single_file(src, model, args.export_checkpoint)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dest}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    """`--nproc N`: run this same command under `torchrun --standalone` with N processes.

    The child command is this process's own arguments without --nproc; torchrun picks a
    free port (--standalone) and its exit status is ours.
    """
    import subprocess

    if "WORLD_SIZE" in os.environ:
        print("error: --nproc inside a torchrun launch; drop --nproc (torchrun already "
              "started the processes)", file=sys.stderr)
        return 2
    if args.nproc % args.ep:
        print(f"error: --ep {args.ep} must divide --nproc {args.nproc}; hint: pick --ep from "
              f"the divisors of {args.nproc}", file=sys.stderr)
        return 2
    argv, skip = [], False
    for word in sys.argv[1:]:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            argv.append(word)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", "-m", "blockdsl.cli", *argv]
    try:
        return subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
        return 130


def _json_summary(r: Any) -> dict[str, Any]:
    from blockdsl.train import summary_row

    return {**summary_row(r), "steps": r.steps, "val": r.val, "aux": r.aux,
            "checkpoint": r.checkpoint, "metrics": r.metrics_path, "loss_plot": r.plot_path}


def _print_summary(r: Any, task: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="training summary", title_justify="left", show_header=False)
    t.add_column(justify="left")
    t.add_column(justify="right")
    unit = "tokens" if task == "lm" else "images"
    t.add_row("steps", f"{r.steps:,}  (stopped by {r.stopped_by})")
    t.add_row(unit, f"{r.tokens:,}")
    t.add_row("train time (all runs)", f"{r.train_seconds:.1f} s")
    t.add_row("wall time (this run)", f"{r.wall_seconds:.1f} s")
    t.add_row(f"{unit}/s", f"{r.tokens_per_s:,.0f}")
    t.add_row("train loss", _fmt(r.train_loss, ".4f"))
    for k, v in r.aux.items():
        t.add_row(f"aux {k}", _fmt(v, ".4g"))
    first = f"{_fmt(r.first_val.get('val_loss'), '.4f')} -> " if len(r.evals) > 1 else ""
    t.add_row("val loss", first + _fmt(r.val.get("val_loss"), ".4f"))
    if "val_bpb" in r.val:
        t.add_row("val bits/byte", _fmt(r.val["val_bpb"], ".4f"))
    if "val_acc" in r.val:
        t.add_row("val accuracy", _fmt(r.val["val_acc"], ".2%"))
    if r.mfu is not None:
        t.add_row("achieved FLOP/s", f"{r.flops_per_s / 1e9:,.1f} G  (3 x forward)")
        t.add_row("measured matmul peak", f"{r.peak_flops_per_s / 1e9:,.1f} G")
        t.add_row("MFU", f"{r.mfu:.1%}")
    if r.checkpoint is not None:
        t.add_row("checkpoint", str(r.checkpoint))
    if r.metrics_path is not None:
        t.add_row("metrics", str(r.metrics_path))
    if r.plot_path is not None:
        t.add_row("loss curve", str(r.plot_path))
    Console().print(t)
