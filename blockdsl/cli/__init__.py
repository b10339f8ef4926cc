"""`blockdsl` command line: thin argument parsing and rendering over the library.

`check` never imports torch (instant); `compile` builds only when asked to (`--smoke`,
`--tune`). Errors in a spec print as `file:line:col` with the line, a caret and a hint,
and exit 1; never a traceback (set BLOCKDSL_DEBUG=1 to see one for internal errors).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from blockdsl.exits import exit_status

# Subcommands that live in their own module: each has register(subparsers) and run(args).
_PLUGINS = ("blockdsl.cli.train", "blockdsl.cli.search", "blockdsl.cli.tokenize",
            "blockdsl.cli.compare",
            "blockdsl.cli.export")
# Subcommands defined here: running one skips importing the plugin modules.
_CORE = ("check", "compile")


@contextlib.contextmanager
def _without_optional_regex() -> Iterator[None]:
    """Imports in this block see the third-party `regex` module as not installed.

    lark imports `regex` whenever it is installed (~10 ms, a third of lark's import), but
    only `Lark(regex=True)` and Unicode-category terminals need it; our grammar has neither.
    The CLI does this, not parse.py: a `blockdsl` process holds no other lark grammar, while
    a program using blockdsl as a library keeps the lark it would have had.
    """
    absent = "regex" not in sys.modules
    if absent:
        sys.modules["regex"] = None  # type: ignore[assignment]  # `import regex` fails
    try:
        yield
    finally:
        if absent:
            del sys.modules["regex"]  # a later `import regex` works as usual


def _load_plan(args: argparse.Namespace):
    with _without_optional_regex():
        from blockdsl.lang.parse import load_module
    from blockdsl.lang.resolve import resolve

    return resolve(load_module(Path(args.spec)), args.model)


# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    from blockdsl.graph import human, report

    plan = _load_plan(args)
    rep = report(plan)
    if args.json:
        import json

        print(json.dumps({"ok": True, "spec": args.spec, "model": plan.name,
                          "sublayers": rep.layers, "blocks": rep.units,
                          "shared_groups": len(rep.sharing), "search_choices": len(plan.choices),
                          "stored_params": rep.stored_params,
                          "active_params_per_token": rep.active_params_per_token,
                          "flops_per_token": float(rep.flops_per_token), "seq": rep.seq}))
        return 0
    if args.quiet:
        return 0
    shared = f", {len(rep.sharing)} shared groups" if rep.sharing else ""
    choices = f", {len(plan.choices)} search choices" if plan.choices else ""
    print(
        f"ok: {args.spec}: model {plan.name}: {rep.layers} sublayers in {rep.units} blocks{shared}"
        f"{choices}; {rep.stored_params:,} stored params, {rep.active_params_per_token:,} active/token, "
        f"{human(rep.flops_per_token)} FLOPs/token at seq {rep.seq}"
    )
    return 0


# ---------------------------------------------------------------- compile


def _summary_table(rep, plan) -> Any:
    from rich.table import Table

    from blockdsl.graph import human

    t = Table(title=f"{plan.name}  ({plan.file})", title_justify="left", show_lines=False)
    for col, just in (("#", "right"), ("layer", "left"), ("primitive", "left"),
                      ("norm", "left"), ("parameter group", "left"), ("params", "right"),
                      ("active", "right"), ("FLOPs/token", "right")):
        t.add_column(col, justify=just)
    for r, layer in zip(rep.rows, plan.layers):
        group = r.group.removeprefix("share:")
        if r.applications > 1:
            group = f"{group} (×{r.applications}, {'owns' if r.owner else 'shares'})"
        norm = layer.placement + (f"/{layer.norms[0].kind}" if layer.norms else "")
        t.add_row(
            str(r.index), f"{r.block}[{r.repeat}].{r.label}", r.prim, norm, group,
            f"{r.params:,}" if r.owner else "—", f"{int(r.active):,}" if r.owner else "—",
            human(r.flops),
        )
    return t


def _totals_table(rep) -> Any:
    from rich.table import Table

    from blockdsl.graph import human

    t = Table(show_header=False, box=None)
    t.add_column(justify="left")
    t.add_column(justify="right")
    t.add_row("stored parameters", f"{rep.stored_params:,}  ({human(rep.stored_params)})")
    t.add_row("active parameters / token",
              f"{rep.active_params_per_token:,}  ({human(rep.active_params_per_token)})")
    f = rep.flops_per_token
    t.add_row(f"FLOPs / token (forward, seq {rep.seq})", f"{f:,.0f}  ({human(f)})")
    t.add_row("sublayers / blocks", f"{rep.layers} / {rep.units}")
    for k, v in rep.breakdown.items():
        if v:
            t.add_row(f"  {k}", f"{v:,}")
    return t


def cmd_compile(args: argparse.Namespace) -> int:
    import json

    from blockdsl.compile import default_out, smoke, smoke_shape, write_artifacts, write_summary
    from blockdsl.graph import report

    plan = _load_plan(args)
    if args.smoke:
        smoke_shape(plan, args.batch, args.seq)  # a bad --seq before anything is written
    rep = report(plan)
    out_dir = Path(args.out) if args.out else default_out(plan)
    summary = write_artifacts(plan, out_dir, rep)
    if args.tune:
        from blockdsl.tune import tune_plan

        device = None if args.device == "auto" else args.device  # None: cuda if present
        summary["tuning"] = tune_plan(plan, device=device, precision=args.precision,
                                      verbose=not (args.json or args.quiet), batch=args.batch)
    if args.smoke:
        summary["smoke"] = smoke(plan, batch=args.batch, seq=args.seq, device=args.device,
                                 force=args.force)
    write_summary(summary, out_dir)
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        table = _summary_table(rep, plan)
        con = _wide_console(table)
        con.print(table)
        con.print(_totals_table(rep))
        if rep.sharing:
            con.print(f"sharing: {len(rep.sharing)} groups used more than once: "
                      + ", ".join(f"{k.removeprefix('share:')}×{v}" for k, v in
                                  list(rep.sharing.items())[:8])
                      + (" ..." if len(rep.sharing) > 8 else ""))
        if args.smoke:
            s = summary["smoke"]
            status = "[green]finite[/]" if s["finite"] else "[red]NaN/inf found[/]"
            con.print(f"smoke: forward+backward on {s['input_shape']} ({s['device']}): "
                      f"{s['step_seconds'] * 1000:.1f} ms/step, loss {s['loss']:.4f}, {status}; "
                      f"module has {s['module_params']:,} params"
                      + ("" if s["module_params"] == rep.stored_params else
                         f" [red](report says {rep.stored_params:,})[/]"))
        con.print(f"artifacts in {out_dir}/: resolved.block, summary.json, graph.svg")
    if args.smoke and not summary["smoke"]["finite"]:
        return 3
    return 0


def _wide_console(table: Any) -> Any:
    """A console wide enough that the table shows every cell whole.

    rich fits a table to the console by cutting cells with an ellipsis (`2,363,9…`), and a
    console that is not a terminal is 80 columns (or $COLUMNS): a piped or logged summary
    lost every number. So: 160 columns when not a terminal (as `search` does), and never
    less than the table's own minimum (its longest unbreakable word per column), so that
    on a narrow terminal a long row wraps on screen instead of losing digits.
    """
    from rich.console import Console
    from rich.measure import Measurement

    con = Console()
    width = con.width if con.is_terminal else 160
    need = Measurement.get(con, con.options.update(width=10_000), table).minimum
    return con if need <= width == con.width else Console(width=max(width, need))


# ---------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    """argparse with blockdsl's exit codes: a malformed flag is the user's mistake like a bad
    spec (exit 1), so that exit 2 means one thing only, an internal error (a bug to report).
    Subparsers inherit the class (argparse's `add_subparsers` uses `type(self)`)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def make_parser(plugins: bool = True) -> argparse.ArgumentParser:
    """The argument parser; `plugins=False` leaves out the train/search subcommands."""
    from blockdsl.cli import common as C

    p = _Parser(
        prog="blockdsl", description="Compose, compile and search transformer block architectures.",
        epilog=C.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="parse, resolve and validate a spec (instant, no torch)",
                       description="Parse, resolve and validate a spec; prints one `ok:` line.")
    C.add_spec(c)
    C.add_output(c, quiet_help="print nothing on success (the exit code says it)",
                 json_help="print the counts as one JSON object on stdout")
    c.set_defaults(func=cmd_check)

    c = sub.add_parser("compile", help="summarise a spec, write artifacts, optionally build and run it",
                       description="Summarise a spec (a table of its layers and totals) and write "
                       "resolved.block, summary.json and graph.svg into --out.")
    C.add_spec(c)
    c.add_argument("--out", default=None, help="artifact folder (default: out/<model>)")
    C.add_output(c, quiet_help="no tables (the artifacts are still written)")
    c.add_argument("--smoke", action="store_true",
                   help="build the module and run one forward+backward pass on random input")
    c.add_argument("--tune", action="store_true",
                   help="time each implementation choice on this spec's shapes and cache the fastest")
    C.add_shape(c, batch_help="sequences (images) per step: --tune times the kernels at this batch "
                "(default 4096 tokens' worth) and --smoke runs it (default 2)",
                seq_help="sequence length for --smoke (default: the model's)")
    C.add_torch(c)
    c.add_argument("--force", action="store_true",
                   help="--smoke even when the estimated memory exceeds what the device has")
    c.set_defaults(func=cmd_compile)

    for name in _PLUGINS if plugins else ():
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before torch loads OpenMP: spinning worker threads made small kernels up to 20x
    # slower whenever another process shared the cores (measured; see README). A value
    # set by the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # `check` and `compile` on a spec must not pay for the training/search modules'
    # imports (their modules import torch only when run, but compiling and registering
    # them still costs ~10 ms of a cold `check`).
    words = sys.argv[1:] if argv is None else argv
    args = make_parser(plugins=not words or words[0] not in _CORE).parse_args(argv)
    try:
        return exit_status(lambda: args.func(args))
    finally:
        if argv is None:
            # The process's own command line, so it exits next: move every object to the
            # GC's permanent generation, or the collections during interpreter shutdown
            # re-scan them all (measured: a cold `check` 245 -> 213 ms).
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
