"""The result files of a study: the winning block(s) as `.block` text, the baseline's, a
plot and summary.json, written whole (a temporary name renamed over the old file) and by
one writer at a time."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna

from blockdsl.files import atomic_write
from blockdsl.search import journal
from blockdsl.search.constraints import fmt
from blockdsl.search.errors import SearchError
from blockdsl.search.plots import plot_study
from blockdsl.search.results import baseline_trial, beats, best_trials, summarize


def write_results(study: optuna.Study, out: Path,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """best.block (or pareto/*.block), baseline.block, a PNG, and summary.json in `out`.

    Every file is written to a temporary name in the same folder and renamed over the old
    one, so a reader (or a kill) never sees half a file; writers in several processes take
    turns on an flock on `out/.write.lock`, and each reads the study inside it, so the last
    to write has the freshest view. `extra` goes into summary.json with the rest (one write).
    Only blocks that beat the baseline are written: when none does, there is no best.block
    (a stale one is removed) and summary.json says `"beats_baseline": false`.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SearchError(f"cannot create the results folder {out}: {e.strerror}") from None
    with _folder_lock(out):
        summary = summarize(study)
        if extra:
            summary.update(extra)
        base = baseline_trial(study)
        best = [t for t in best_trials(study) if beats(t, base, study.directions)]
        files: list[str] = []
        multi = len(study.directions) > 1
        for t in best:
            text = t.user_attrs.get("block")
            if not text:
                continue
            vals = ", ".join(f"{m}={fmt(v)}" for (m, _), v in zip(summary["objectives"], t.values))
            header = f"# blockdsl search: study {study.study_name}, trial {t.number}: {vals}\n"
            path = (out / "pareto" / f"trial{t.number}.block") if multi else out / "best.block"
            path.parent.mkdir(exist_ok=True)
            atomic_write(path, (header + text).encode("utf-8"))
            files.append(str(path))
        # Files of an earlier write that are no longer results (new ones are in place first).
        stale = list((out / "pareto").glob("*.block")) if multi else [out / "best.block"]
        for old in stale:
            if str(old) not in files:
                old.unlink(missing_ok=True)
        if base is not None and base.user_attrs.get("block"):
            atomic_write(out / "baseline.block", base.user_attrs["block"].encode("utf-8"))
        shows: dict[str, int] = {}
        plot = plot_study(study, out / ("pareto.png" if multi else "history.png"), shows)
        summary["files"] = {"blocks": files, "plot": str(plot) if plot else None,
                            "plot_shows": shows}
        atomic_write(out / "summary.json",
                     json.dumps(summary, indent=2, default=str).encode("utf-8"))
    return summary


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on `folder/.write.lock`, the journal's kind of lock (released by
    the kernel if its holder dies); nothing where fcntl does not exist."""
    if journal.fcntl is None:  # pragma: no cover - Windows
        yield
        return
    lock = journal.FlockLock(str(folder / ".write.lock"))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
