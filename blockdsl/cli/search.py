"""`blockdsl search`: run, resume or show an architecture search. Thin: parsing and
printing; the logic is in `blockdsl.search` (its `run` module does the setup and starts
the workers).

    blockdsl search [SPEC] [--budget N] [--workers N] [--study NAME] [--storage URL] ...
    blockdsl search show STUDY [--storage URL] [--write] [--json]

Torch and Optuna are imported only when the command runs, so `blockdsl check` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from blockdsl.names import SAMPLERS, STARTS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search a .block space with Optuna (default: search/brainformer.block)",
        description="Search the choices of a .block space: each trial binds them, builds the "
        "model, checks constraints, trains it for a fixed time and reports validation loss. "
        "`blockdsl search show STUDY` lists a stored study.",
    )
    from blockdsl.cli import common as C

    p.add_argument("target", nargs="*", metavar="SPEC",
                   help="a .block file holding a space (default search/brainformer.block)")
    p.add_argument("--model", dest="space_name", metavar="NAME",
                   help="which space of the file (default: the last)")
    C.alias(p, "--space", "space_name")
    p.add_argument("--budget", type=C.positive_int, help="trials in the study, all kinds counted "
                   "(default: the space's budget line, else 200)")
    p.add_argument("--baseline-steps", type=C.positive_int, metavar="N",
                   help="training steps of the baseline per trial; a block that steps k times "
                   "faster trains k times as many (the paired clock's equal-time rule, counted "
                   "in steps; default: the space's seconds / pace, 267 for the default space)")
    p.add_argument("--seconds", type=float,
                   help="with --clock wall: wall-clock training seconds per trial. With the "
                   "paired clock (default) it is converted to baseline steps at the space's "
                   "pace, i.e. seconds on the machine that measured the pace, not this one: "
                   "prefer --baseline-steps")
    p.add_argument("--start", choices=STARTS,
                   help="start design: neighbourhood (default) = one-change neighbours of the "
                   "baseline first, so a short --budget trains feasible blocks; random = "
                   "Optuna's random start-up trials")
    p.add_argument("--study", help="study name: resumes it when it exists (default: a new "
                   "<space>-<date-time>)")
    p.add_argument("--storage", help="journal file path, or an RDB URL such as "
                   "postgresql://user:pw@host/db (default: studies/<study>.journal)")
    p.add_argument("--workers", type=C.positive_int, default=None,
                   help="local worker processes (default 1; each uses --threads torch threads; "
                   "with --device cuda and several GPUs, each worker gets its own)")
    p.add_argument("--threads", type=C.positive_int, help="torch threads per worker (default 1: these models "
                   "are too small to gain from more, and lose badly when cores are shared)")
    p.add_argument("--clock", choices=["wall", "paired"],
                   help="paired (default): train each trial for the steps it takes in --seconds "
                   "at its measured speed relative to the baseline, so machine load does not change "
                   "results; wall: for --seconds of wall-clock time (Brainformer's literal rule)")
    p.add_argument("--sampler", choices=SAMPLERS,
                   help="auto = TPE for one objective, NSGA-II for several")
    p.add_argument("--seed", type=int, help="sampler and training seed (default 0)")
    p.add_argument("--no-prune", dest="prune", action="store_false", default=None,
                   help="train every trial for the full budget")
    p.add_argument("--batch", dest="batch_size", type=C.positive_int, metavar="N",
                   help="sequences per step (default: the space's)")
    C.alias(p, "--batch-size", "batch_size", type=C.positive_int)
    p.add_argument("--seq", dest="seq_len", type=C.positive_int, metavar="N",
                   help="training context (default: the model's; may only be shorter)")
    C.alias(p, "--seq-len", "seq_len", type=C.positive_int)
    p.add_argument("--precision", choices=C.PRECISIONS,
                   help=C.PRECISION_HELP.replace("(default:", "(default, unless the space's budget "
                                                 "line or a resumed study says otherwise:"))
    p.add_argument("--device", help="cpu (default: many small trials run best one per core), "
                   "auto (cuda if present), cuda, cuda:1, ...")
    p.add_argument("--data", help="training data (default: the Python stdlib corpus / digits)")
    p.add_argument("--out", help="results folder (default studies/<study>/)")
    p.add_argument("--quiet", dest="live", action="store_false",
                   help="no live table: one line per finished trial, then the result")
    C.alias(p, "--no-live", "live", action="store_false")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--tensorboard", action="store_true",
                   help="TensorBoard event files per trial in <out>/tb/trial-<n> (the scalars "
                   "of a train run); needs pip install 'blockdsl[tensorboard]'")
    # `search --storage X show STUDY --write` (show after options) still works the old way
    C.alias(p, "--write", "write", action="store_true")
    p.set_defaults(func=run, write=False)
    _add_show(p)


def _add_show(search: argparse.ArgumentParser) -> None:
    """`search show STUDY` gets a parser of its own, so `search show --help` is show's help.

    argparse cannot have an optional sub-command next to an optional positional (`search
    [SPEC]`), so the search parser hands its arguments to the show parser when the first
    one is `show`: same parser class (exit codes), same namespace as any sub-command.
    """
    from blockdsl.cli import common as C

    base = type(search)
    show = base(prog=f"{search.prog} show", description="List a stored study's trials, its "
                "best block(s) against the baseline, and optionally (re)write its result files.")
    show.add_argument("study", metavar="STUDY", help="study name")
    show.add_argument("--storage", help="journal file path or RDB URL (default: "
                      "studies/<study>.journal)")
    show.add_argument("--write", action="store_true",
                      help="(re)write best.block, history.png and summary.json into --out")
    show.add_argument("--out", help="results folder for --write (default studies/<study>/)")
    C.add_output(show, quiet_help="only the result table, not every trial")
    show.set_defaults(func=run_show)

    class SearchParser(base):  # type: ignore[misc, valid-type]
        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            if args and args[0] == "show":
                return show.parse_known_args(args[1:], namespace)
            return super().parse_known_args(args, namespace)

    search.__class__ = SearchParser


# ----------------------------------------------------------------------------- rendering


def _console(stderr: bool = False) -> Any:
    """A rich console; wide when not a terminal, so logged tables do not wrap at 80."""
    from rich.console import Console

    con = Console(stderr=stderr)
    return con if con.is_terminal else Console(stderr=stderr, width=160)


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f}"


def _params(v: Any) -> str:
    if v is None:
        return "—"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.0f}K"


_STYLE = {"trained": "green", "pruned": "yellow", "infeasible": "magenta", "copy": "cyan",
          "failed": "red", "lost": "red", "running": "bold", "waiting": "dim", "surplus": "dim",
          "interrupted": "red"}


def trials_table(study: Any, limit: int | None = 18, title: str | None = None) -> Any:
    from rich.table import Table

    from blockdsl.search import trial_rows

    rows = trial_rows(study)
    t = Table(title=title, title_justify="left", expand=False)
    for col, just in (("#", "right"), ("status", "left"), ("architecture", "left"),
                      ("val loss", "right"), ("step", "right"), ("×base", "right"),
                      ("active", "right"), ("note", "left")):
        t.add_column(col, justify=just, overflow="fold" if col == "note" else "ellipsis",
                     max_width=48 if col in ("architecture", "note") else None)
    shown = rows if limit is None else rows[-limit:]
    base = next((r for r in rows if r.role == "baseline"), None)
    if base is not None and base not in shown:
        shown = [base] + shown[1:] if shown else [base]
    for r in shown:
        status = r.status + (" (baseline)" if r.role == "baseline" else "")
        style = _STYLE.get(r.status, "")
        t.add_row(str(r.number), f"[{style}]{status}[/]" if style else status, r.arch,
                  _num(r.val_loss), f"{r.step_time * 1e3:.1f}ms" if r.step_time else "—",
                  _num(r.ratio, 2), _params(r.active_params), r.note)
    return t


def headline(study: Any, budget: int | None, t0: float | None) -> str:
    from blockdsl.search import summarize

    s = summarize(study)
    by = s["by_status"]
    parts = [f"[bold]{s['study']}[/]: {s['counted']}/{budget or '?'} trials"]
    parts.append(", ".join(f"{k} {v}" for k, v in sorted(by.items())))
    if s["best"]:
        b = s["best"][0]
        parts.append(f"best #{b['number']} {_num(b['values'][0])}")
    if s["baseline"]:
        parts.append(f"baseline {_num(s['baseline']['values'][0])}")
    if t0 is not None:
        el = time.time() - t0
        parts.append(f"{int(el // 60)}:{int(el % 60):02d} elapsed")
    return " | ".join(parts)


def final_report(study: Any, summary: dict[str, Any]) -> Any:
    """Best block(s) next to the baseline: the figures the search is for."""
    from rich.table import Table

    t = Table(title="result", title_justify="left")
    for col in ("", "trial", "architecture", "val loss", "step time", "×base", "active params",
                "steps"):
        t.add_column(col, justify="left" if col in ("", "architecture") else "right")
    rows = []
    if summary["baseline"]:
        rows.append(("baseline", summary["baseline"]))
    label = "best" if len(summary["best"]) <= 1 else "pareto"
    rows += [(label, b) for b in summary["best"]]
    for name, r in rows:
        st = r.get("step_time")
        t.add_row(name, str(r["number"]), r.get("arch") or "", _num(r.get("val_loss")),
                  f"{st * 1e3:.1f} ms" if st else "—", _num(r.get("step_time_ratio"), 2),
                  _params(r.get("active_params")), str(r.get("steps") or "—"))
    return t


# ----------------------------------------------------------------------------- commands


def run(args: argparse.Namespace) -> int:
    """The subcommand; a `SearchError` (bad storage, study, space) is the user's to fix:
    one line and exit 1 (the CLI's generic handler would make it exit 2, argparse's code)."""
    from blockdsl.search import SearchError

    try:
        return _run(args)
    except SearchError as e:
        print(f"error: {e.cli_message}", file=sys.stderr)
        return 1


def run_show(args: argparse.Namespace) -> int:
    """`search show STUDY`; its errors are the user's too (exit 1)."""
    from blockdsl.search import SearchError

    try:
        return cmd_show(args, args.study)
    except SearchError as e:
        print(f"error: {e.cli_message}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    target = list(args.target)
    if target and target[0] == "show":
        if len(target) != 2:
            raise SystemExit("usage: blockdsl search show STUDY [--storage URL]")
        args.quiet = False
        return cmd_show(args, target[1])
    if len(target) > 1:
        raise SystemExit("usage: blockdsl search [SPEC] [options] (one space file)")
    return cmd_search(args, target[0] if target else None)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"trials": args.budget, "seconds": args.seconds, "sampler": args.sampler,
            "seed": args.seed, "prune": args.prune, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "precision": args.precision, "device": _device(args.device),
            "data": args.data, "threads": args.threads, "clock": args.clock,
            "baseline_steps": args.baseline_steps, "start": args.start}


def _device(name: str | None) -> str | None:
    """--device as the other commands read it (`auto` included); a bad one exits 1."""
    if name is None:
        return None
    from blockdsl.train import resolve_device

    return str(resolve_device(name))


def cmd_search(args: argparse.Namespace, space_path: str | None) -> int:
    from blockdsl import search as S

    S.quiet_optuna()
    # Resuming (no SPEC, --study NAME): the study remembers its space file and settings.
    setup = S.prepare(space_path, study=args.study, storage=args.storage,
                      space_name=args.space_name, resume=True, out=args.out,
                      tensorboard=args.tensorboard, defaults={"threads": 1}, **_settings(args))
    space, study, cfg, name, out = setup.space, setup.study, setup.cfg, setup.name, setup.out
    storage_url = setup.storage_url
    workers = max(1, args.workers or 1)

    con = _console(stderr=args.json)
    live = args.live and con.is_terminal
    con.print(f"study [bold]{name}[/] on {S.redact(storage_url)}: space {space.name} "
              f"({space.file}), {cfg.trials} trials, {S.describe_budget(cfg)}, "
              f"{workers} worker(s) x {cfg.threads} thread(s), sampler {cfg.sampler}")
    t0 = time.time()
    interrupted = False
    try:
        if workers == 1:
            interrupted = _run_inline(setup, con, live, t0)
        else:
            _run_processes(setup, workers, con, live, t0)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        con.print(f"[red]interrupted[/]: finished trials are kept; resume with --study {name}")
    summary, running = S.conclude(setup, interrupted, {"wall_seconds_this_run": time.time() - t0})
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        con.print(final_report(study, summary))
        _print_comparison(con, summary)
        if running:
            con.print(f"other workers are still running trial(s) {', '.join(map(str, running))}:"
                      f" the last to finish writes the results (or later: blockdsl search show "
                      f"{name} --write)")
        else:
            con.print(f"wrote {', '.join(summary['files']['blocks'] + [summary['files']['plot'] or ''])}"
                      f", {out / 'summary.json'}")
        if not S.is_url(storage_url):
            given = f" --storage {storage_url}" if args.storage else ""
            # never wrapped: a command line to copy, whatever the path's length
            con.print(f"inspect: blockdsl search show {name}{given}   |   "
                      f"optuna-dashboard {storage_url}", soft_wrap=True, highlight=False)
        else:
            con.print(f"inspect: blockdsl search show {name} --storage URL   |   "
                      "optuna-dashboard URL")
    return 130 if interrupted else 0


def _print_comparison(con: Any, s: dict[str, Any]) -> None:
    b, best = s.get("baseline"), (s.get("best") or [None])[0]
    if s.get("verdict"):
        con.print(f"[bold]found[/]: {s['verdict']}", highlight=False)
    if b and s.get("beats_baseline") is False:
        return
    if not b or not best or best.get("val_loss") is None or b.get("val_loss") is None:
        return
    d = best["val_loss"] - b["val_loss"]
    con.print(f"best block (trial {best['number']}): val loss {best['val_loss']:.4f} vs baseline "
              f"{b['val_loss']:.4f} ({d:+.4f}); step time {best['step_time'] * 1e3:.1f} ms vs "
              f"{b['step_time'] * 1e3:.1f} ms (x{best['step_time_ratio']:.2f}); "
              f"{s['trials']} trials" + (f" in {s['wall_seconds_this_run'] / 60:.1f} min"
                                         if s.get("wall_seconds_this_run") else ""))


def _run_inline(setup: Any, con: Any, live: bool, t0: float) -> bool:
    """One worker in this process; True when Ctrl-C stopped it."""
    from blockdsl import search as S

    study, cfg = setup.study, setup.cfg
    state: dict[str, Any] = {"line": ""}
    printed: set[int] = set()

    def render() -> Any:
        from rich.console import Group

        return Group(headline(study, cfg.trials, t0), trials_table(study), state["line"])

    if live:
        from rich.live import Live

        with Live(render(), console=con, refresh_per_second=2, transient=False) as lv:
            def on_event(kind: str, info: dict[str, Any]) -> None:
                n = info.get("number")
                state["line"] = f"[dim]trial {n}: {kind} " + (
                    f"rung {info['rung']} = {info['value']:.4f}" if kind == "rung" else
                    info.get("arch", "") if kind == "arch" else "") + "[/]"
                lv.update(render())

            outcome = S.run_workers(setup, 1, on_event)
            lv.update(render())
    else:
        def on_event(kind: str, info: dict[str, Any]) -> None:
            if kind in ("done", "infeasible", "copy", "failed", "pruned"):
                _print_new(con, study, printed)

        outcome = S.run_workers(setup, 1, on_event)
        _print_new(con, study, printed)
    return outcome.interrupted


def _print_new(con: Any, study: Any, printed: set[int]) -> None:
    from blockdsl.search import trial_rows

    for r in trial_rows(study):
        if r.number in printed or r.state in ("RUNNING", "WAITING"):
            continue
        printed.add(r.number)
        con.print(f"trial {r.number:>4} {r.status:<10} {_num(r.val_loss)} "
                  f"{'x' + _num(r.ratio, 2) if r.ratio else '':>6} {r.arch}  {r.note}",
                  highlight=False)


def _run_processes(setup: Any, workers: int, con: Any, live: bool, t0: float) -> None:
    """`workers` processes (the library starts them); this one shows their progress."""
    from blockdsl import search as S

    study, cfg = setup.study, setup.cfg
    printed: set[int] = set()
    if live:
        from rich.console import Group
        from rich.live import Live

        with Live(console=con, refresh_per_second=1) as lv:
            outcome = S.run_workers(setup, workers, watch=lambda: lv.update(
                Group(headline(study, cfg.trials, t0), trials_table(study))))
    else:
        outcome = S.run_workers(setup, workers, watch=lambda: _print_new(con, study, printed))
    for i, rc in outcome.failed_workers:
        con.print(f"[red]worker {i} exited with status {rc}[/]")


def cmd_show(args: argparse.Namespace, name: str) -> int:
    from blockdsl import search as S

    S.quiet_optuna()
    study, info = S.load_study_info(name, args.storage)
    summary = S.summarize(study)
    if args.write:
        out = Path(args.out) if args.out else S.STUDY_DIR / name
        summary = S.write_results(study, out)
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    con = _console()
    budget = (info.get("config") or {}).get("trials")
    con.print(headline(study, budget, None))
    if not args.quiet:
        con.print(trials_table(study, limit=None))
    con.print(final_report(study, summary))
    _print_comparison(con, summary)
    return 0
