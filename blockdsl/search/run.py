"""Running a search: the setup sequence (space -> config -> storage -> study) written once,
then one worker in this process or N worker processes, then the results.

The library's `run` / `search`, the CLI and every worker process go through here, so the
three can not drift apart (they were three copies of the sequence). Worker processes are
started as `python -m blockdsl.search STUDY STORAGE INDEX SPACE_FILE SPACE`: a process
each rather than threads, because a trial is CPU-bound Python and torch work that a
thread would share one interpreter lock for, and a separate process is what the liveness
protocol can watch (its pid) and a kill -9 can stop without taking the others with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from blockdsl.search.errors import SearchError
from blockdsl.search.liveness import others_running
from blockdsl.search.output import write_results
from blockdsl.search.results import summarize
from blockdsl.search.space import (
    STUDY_DIR,
    SearchConfig,
    Space,
    default_space_path,
    load_space,
    make_config,
    new_study_name,
)
from blockdsl.search.storage import create_study, default_storage_path, load_study_info, open_storage
from blockdsl.search.worker import Event, Worker


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*set_constraint.*")


@dataclass
class Setup:
    """An opened search: everything a worker (here or in another process) needs."""

    space: Space
    cfg: SearchConfig
    study: optuna.Study
    storage_url: str  # the journal path or RDB URL a worker process opens
    out: Path  # the results folder

    @property
    def name(self) -> str:
        return self.study.study_name


@dataclass
class Outcome:
    """How a run ended: stopped by Ctrl-C inside a trial, and worker processes that failed
    (index, exit status)."""

    interrupted: bool = False
    failed_workers: list[tuple[int, int]] = field(default_factory=list)


def _stored(study: str | None, storage: str | None, root: Path | None) -> dict[str, Any]:
    """What a study remembers (space file, space, config) when it is resumed without a
    space: {} when there is no such study yet (a new one, on the default space)."""
    if not study:
        return {}
    try:
        _, stored = load_study_info(study, storage, root)
    except SearchError:
        return {}
    if stored.get("space_file") is None:
        # A study whose first run was killed between creating it and recording its
        # space (or one another tool made): the default space must not fill it.
        raise SearchError(
            f"study '{study}' records no space file (its first run was stopped "
            "before recording it, or another tool created it): name the space, "
            f"blockdsl search SPACE --study {study}")
    return stored


def _check_data(space: Space, cfg: SearchConfig) -> None:
    """The data every trial reads, loaded for the baseline before the study starts: a
    missing file, a corpus of the wrong kind or token ids outside the vocabulary is one
    error (located at the baseline for a vocabulary) instead of a failure in every trial
    and a finished search that found nothing. Loading caches the corpus, so the worker's
    own load is then quick. A space without a baseline has no model to check the data
    against; there only a missing path is caught. (The training package is imported here,
    not at the top: it brings torch, which `search show` and the results do not need.)"""
    from blockdsl.lang.errors import BlockError
    from blockdsl.train import tokdata
    from blockdsl.train.data import DataError, load_for_model

    if space.baseline is None:
        if cfg.data is not None and not Path(cfg.data).expanduser().exists():
            raise SearchError(f"--data {cfg.data}: no such file or folder")
        return
    plan = space.resolve_baseline()
    try:
        load_for_model(plan.io, cfg.data, cfg.seq_len)
    except tokdata.VocabMismatch as e:
        raise BlockError(e.message, plan.span, e.hint) from None
    except DataError as e:
        raise SearchError(str(e)) from None


def _event_files(tensorboard: str | bool | None, cfg: SearchConfig, out: Path) -> str | None:
    """The TensorBoard folder of this run: None keeps the config's, False means none, True
    means `<out>/tb`, a string is the folder. Checked here, so a missing package is one
    error before the study starts, not a failure in every trial."""
    if tensorboard is None:
        folder = cfg.tensorboard
    elif tensorboard is True:
        folder = str(out / "tb")
    else:
        folder = tensorboard or None
    if folder:
        from blockdsl.train.tblog import TensorBoardMissing, require

        try:
            require()
        except TensorBoardMissing as e:
            raise SearchError(str(e)) from None
    return folder


def prepare(space: str | Path | Space | None = None, *, study: str | None = None,
            storage: str | None = None, root: Path | None = None, space_name: str | None = None,
            resume: bool = False, out: str | Path | None = None,
            tensorboard: str | bool | None = None, defaults: dict[str, Any] | None = None,
            **settings: Any) -> Setup:
    """Load the space, make the config, open the storage, create (or load) the study.

    `resume`: with no `space`, an existing `study` supplies its space file, space name and
    settings (explicit `settings` win). `defaults` are settings that beat the space's budget
    line but not a resumed study's (the CLI's one thread per worker). `tensorboard`: see
    `_event_files`. Settings that are None count as not given.
    """
    quiet_optuna()
    stored = _stored(study, storage, root) if resume and space is None else {}
    sp = space if isinstance(space, Space) else load_space(
        space or stored.get("space_file") or default_space_path(),
        space_name or stored.get("space"))
    given = {k: v for k, v in settings.items() if v is not None}
    cfg = make_config(sp, **{**(defaults or {}), **(stored.get("config") or {}), **given})
    _check_data(sp, cfg)
    name = study or new_study_name(sp)
    results = Path(out) if out else (root or STUDY_DIR) / name  # beside the journal
    # Set (or cleared) for this run before the study records its config, which worker
    # processes read.
    cfg.tensorboard = _event_files(tensorboard, cfg, results)
    url = storage or str(default_storage_path(name, root))
    st = open_storage(url, name, cfg)
    return Setup(sp, cfg, create_study(sp, cfg, st, name, resume=True), url, results)


def run_workers(setup: Setup, workers: int = 1, on_event: Event | None = None,
                watch: Callable[[], None] | None = None) -> Outcome:
    """Run the study's trials until its budget is used: one worker here (`on_event` sees
    its progress), or `workers` processes (`watch` is called about once a second while
    they run, and once after). Ctrl-C stops the processes cleanly and is re-raised."""
    if workers <= 1:
        worker = Worker(setup.space, setup.study, setup.cfg, on_event)
        worker.run()
        return Outcome(interrupted=worker.stop_requested)
    return Outcome(failed_workers=_run_processes(setup, workers, watch or (lambda: None)))


def worker_env(index: int, device: str, env: dict[str, str], gpus: int) -> dict[str, str]:
    """Worker `index`'s environment: on a machine with several GPUs and device "cuda", its
    own GPU (worker i sees only GPU i mod count, as its "cuda"), so N workers on N GPUs
    train side by side instead of N on GPU 0. An existing CUDA_VISIBLE_DEVICES list is
    what is divided; a device with an index ("cuda:1") or the CPU is left as asked.
    """
    if device != "cuda" or gpus < 2:
        return env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    ids = ids[:gpus] or [str(g) for g in range(gpus)]
    return {**env, "CUDA_VISIBLE_DEVICES": ids[index % len(ids)]}


def _run_processes(setup: Setup, workers: int, watch: Callable[[], None]) -> list[tuple[int, int]]:
    space_file = str(Path(setup.space.file).resolve())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gpus = 0
    if str(setup.cfg.device) == "cuda":
        import torch

        gpus = torch.cuda.device_count()
    procs = [subprocess.Popen([sys.executable, "-m", "blockdsl.search", setup.name,
                               setup.storage_url, str(i), space_file, setup.space.name],
                              env=worker_env(i, str(setup.cfg.device), env, gpus),
                              stdout=subprocess.DEVNULL) for i in range(workers)]
    try:
        while any(p.poll() is None for p in procs):
            watch()
            time.sleep(1.0)
        watch()
    except KeyboardInterrupt:
        for p in procs:  # workers got the same SIGINT; give them the time to stop cleanly
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    return [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (0, 130)]


def run_worker(study: str, storage: str | None, index: int, space_file: str | None = None,
               space_name: str | None = None, **settings: Any) -> int:
    """One worker process's work: run trials of an existing study until its budget is used
    (its space and settings are the study's; explicit `settings` win)."""
    s, info = load_study_info(study, storage)
    space = load_space(space_file or info["space_file"], space_name or info.get("space"))
    given = {k: v for k, v in settings.items() if v is not None}
    cfg = make_config(space, **{**(info.get("config") or {}), **given})
    Worker(space, s, cfg, index=index).run()
    return 0


def conclude(setup: Setup, interrupted: bool = False,
             extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[int]]:
    """The run's summary, and the trials other workers still run.

    One writer: the last worker to finish. While other workers (other drivers on this
    study) still run trials, they will write the complete result, and the summary here has
    `"files": None`; otherwise the result files are written into `setup.out`.
    """
    running = [] if interrupted else others_running(setup.study, setup.cfg.grace)
    if running:
        return {**summarize(setup.study), **(extra or {}), "files": None}, running
    return write_results(setup.study, setup.out, extra), running


def run(space: str | Path | Space | None = None, *, study: str | None = None,
        storage: str | None = None, workers: int = 1, root: Path | None = None,
        on_event: Event | None = None, **settings: Any) -> optuna.Study:
    """Run (or resume) a search: `workers` 1 in this process, more as processes
    (`prepare` then `run_workers`; a failed worker process raises SearchError).

    Returns the study; `summarize(study)` / `write_results(study, dir)` give the results
    (`conclude` is what the CLI calls to write them once, after every worker).
    """
    setup = prepare(space, study=study, storage=storage, root=root, **settings)
    outcome = run_workers(setup, workers, on_event)
    if outcome.failed_workers:
        failed = ", ".join(f"worker {i} (exit status {rc})" for i, rc in outcome.failed_workers)
        raise SearchError(f"{failed} of study '{setup.name}' failed (its message is above); "
                          "the trials that finished are kept: run again with the same study "
                          "to finish the budget")
    return setup.study


def search(space: str | Path | Space | None = None, *, study: str | None = None,
           storage: str | None = None, workers: int = 1, root: Path | None = None,
           on_event: Event | None = None, **settings: Any) -> optuna.Study:
    """Run (or resume) a search (the original name of `run`; same arguments).

    Returns the study; `summarize(study)` / `write_results(study, dir)` give the results.
    """
    return run(space, study=study, storage=storage, workers=workers, root=root,
               on_event=on_event, **settings)
