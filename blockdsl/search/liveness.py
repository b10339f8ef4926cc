"""Which worker runs a trial, and whether it still does.

Each trial records its worker (host, boot id, pid, process start time: a reused pid is
told apart) and, on storages without Optuna's heartbeat (the journal), a heartbeat
attribute written every few seconds. Every worker reaps RUNNING trials whose process is
gone (same machine) or whose heartbeat is older than the grace period (another machine):
they are failed and re-enqueued, so a killed worker costs a retry, not a hole in the
budget.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from blockdsl.search import optuna_glue as glue
from blockdsl.search.optuna_glue import ATTR
from blockdsl.search.storage import fail_stale_trials, own_heartbeat, retry_stale_trial


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()
    if rest[0] == "Z":  # a zombie is dead, its parent just has not waited yet
        return None
    return rest[19]


def worker_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid,
            "start": _proc_start(pid)}


def _process_gone(w: dict[str, Any]) -> bool:
    """True when `w` names a process on this machine that no longer runs."""
    if w.get("host") != socket.gethostname() or w.get("boot") != _boot_id():
        return False
    pid = int(w["pid"])
    if Path("/proc").is_dir():
        start = _proc_start(pid)
        return start is None or (w.get("start") is not None and start != w["start"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def reap_stale(study: optuna.Study, grace: float) -> list[int]:
    """Fail (and re-enqueue) RUNNING trials whose worker is gone; returns their numbers.

    A local worker is gone when its process is; a remote one when its heartbeat (journal:
    our attribute; RDB: Optuna's own, handled by Optuna) is older than `grace` seconds.
    """
    ours = own_heartbeat(glue.storage_of(study))
    fail_stale_trials(study)
    now = time.time()
    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.system_attrs.get(ATTR + "worker")
        reason = None
        if w is not None and _process_gone(w):
            reason = f"worker process {w['pid']} on {w['host']} is gone"
        elif ours:
            beat = t.system_attrs.get(ATTR + "heartbeat")
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if beat is not None and now - float(beat) > grace:
                reason = f"no heartbeat for {now - float(beat):.0f}s"
        if reason is None:
            continue
        try:
            glue.fail_trial(study, t, {"fail_reason": f"worker lost: {reason}", "status": "lost"})
        except (UpdateFinishedTrialError, RuntimeError):
            continue  # another worker reaped it first (or it just finished)
        retry_stale_trial(study, glue.fresh(study, t))
        lost.append(t.number)
    return lost


def others_running(study: optuna.Study, grace: float) -> list[int]:
    """Trials other workers are still running (after reaping those of dead workers): while
    there are some, this worker is not the last one and leaves the results to it."""
    reap_stale(study, grace)
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


class _Heartbeat:
    """Writes `blockdsl:heartbeat` on a trial every few seconds (journal storage only)."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, interval: float):
        self.study, self.trial, self.interval = study, trial, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                glue.set_system_attr(self.study, self.trial, ATTR + "heartbeat", time.time())
            except Exception:  # noqa: BLE001 - the trial finished or the file is busy
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def heartbeat(study: optuna.Study, trial: optuna.Trial,
              interval: float) -> contextlib.AbstractContextManager[Any]:
    """Keep `trial`'s heartbeat while the block runs: ours on a storage that has none of its
    own, nothing where Optuna keeps one."""
    if own_heartbeat(glue.storage_of(study)):
        return _Heartbeat(study, trial, interval)
    return contextlib.nullcontext()


def mark_worker(study: optuna.Study, trial: optuna.Trial, identity: dict[str, Any]) -> None:
    """Record which process runs `trial` (what `reap_stale` checks)."""
    glue.set_system_attr(study, trial, ATTR + "worker", identity)
