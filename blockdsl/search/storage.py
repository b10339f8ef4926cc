"""Where a study lives: Optuna's JournalStorage on a file (the default: no server,
append-only, survives SIGKILL: `blockdsl.search.journal` gives it a lock the kernel
releases when its holder dies and repairs a record torn by a kill), or any RDB URL
(PostgreSQL) for many machines.

The two differ in one way the search cares about: Optuna 5 keeps a heartbeat for RDB
storages only. Everything that depends on that difference is answered here
(`own_heartbeat`, `fail_stale_trials`), so the rest of the search never asks which kind
of storage it has.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial

from blockdsl.names import STARTS
from blockdsl.search import optuna_glue as glue
from blockdsl.search.arch import neighbourhood
from blockdsl.search.errors import SearchError
from blockdsl.search.space import STUDY_DIR, SearchConfig, Space

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

MAX_RETRIES = 2


def default_storage_path(study: str, root: Path | None = None) -> Path:
    return (root or STUDY_DIR) / f"{study}.journal"


def is_url(storage: str | None) -> bool:
    """Whether a --storage value names a database (an RDB URL) rather than a journal file."""
    return bool(storage) and "://" in storage


def open_storage(url: str | None, study: str, cfg: SearchConfig | None = None,
                 root: Path | None = None) -> BaseStorage:
    """A journal file (default `studies/<study>.journal`, or a path), or an RDB URL."""
    cfg = cfg or SearchConfig()
    if is_url(url):
        return _rdb_storage(_driver_url(url), cfg)
    path = (Path(url).expanduser() if url else default_storage_path(study, root)).absolute()
    from optuna.storages import JournalStorage

    from blockdsl.search.journal import JournalError, open_backend

    try:
        backend = open_backend(str(path))
    except JournalError as e:
        raise SearchError(e.cli_message) from None
    try:
        return JournalStorage(backend)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # Every line is a JSON record, but not one Optuna can replay (a hand-made file).
        raise SearchError(f"{path} is not a valid Optuna journal ({type(e).__name__}: "
                          f"{str(e)[:80]}): pass a journal that blockdsl search wrote, a new "
                          "file name, or a database URL") from None


def _rdb_storage(url: str, cfg: SearchConfig, attempts: int = 5) -> BaseStorage:
    """RDBStorage with Optuna's heartbeat; a stale trial is retried by `retry_stale_trial`.

    Workers that start together on an empty database race to create Optuna's tables (one
    gets a unique-violation from the catalogue); the loser simply tries again.
    """
    import random

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=max(1, int(cfg.heartbeat)),
                    grace_period=max(2, int(cfg.grace)),
                    heartbeat_stale_trial_callback=retry_stale_trial,
                )
        except ImportError as e:
            raise SearchError(f"storage {url.split('://')[0]}: a driver is missing ({e}); for "
                              "PostgreSQL: pip install 'blockdsl[postgres]'") from None
        except Exception as e:  # noqa: BLE001 - sqlalchemy's many connection errors
            racing = "already exists" in str(e) or "duplicate" in str(e).lower()
            if not racing or attempt == attempts - 1:
                raise SearchError(
                    f"cannot open storage {redact(url)}: {str(e).splitlines()[0]}") from None
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def _driver_url(url: str) -> str:
    """`postgresql://` means psycopg 3 to SQLAlchemy 2.1 (the `postgres` extra installs it); a
    machine that only has psycopg2 gets it named explicitly."""
    import importlib.util

    if url.startswith(("postgresql://", "postgres://")):
        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
            return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def own_heartbeat(storage: BaseStorage) -> bool:
    """Whether blockdsl keeps the trials' heartbeat itself: the journal has none in Optuna
    5, so each trial writes `blockdsl:heartbeat` and workers reap by its age; an RDB
    storage has Optuna's own (set up in `_rdb_storage`)."""
    from optuna.storages import JournalStorage

    return isinstance(storage, JournalStorage)


def fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's own heartbeat check where it has one (RDB); the journal's is `reap_stale`'s.

    Optuna runs it when a trial starts; a worker waiting on a repeated architecture must
    not wait forever on a dead remote owner either, so the reaper calls it too.
    """
    if own_heartbeat(glue.storage_of(study)):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Re-enqueue a trial whose worker died (same params, same role), up to MAX_RETRIES."""
    retries = int(trial.user_attrs.get("retries", 0))
    if retries >= MAX_RETRIES:
        return
    attrs: dict[str, Any] = {"retry_of": trial.number, "retries": retries + 1}
    if "role" in trial.user_attrs:
        attrs["role"] = trial.user_attrs["role"]
    study.enqueue_trial(dict(trial.params), user_attrs=attrs, skip_if_exists=False)


def create_study(space: Space, cfg: SearchConfig, storage: BaseStorage, name: str,
                 resume: bool = True) -> optuna.Study:
    """Create (or load) the study; record the space and config; enqueue the baseline first."""
    directions = space.directions
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        if not resume:
            raise SearchError(f"study '{name}' exists; pass --study {name} to resume it")
        have = [d.name.lower() for d in existing.directions]
        if have != directions:
            raise SearchError(f"study '{name}' optimises {have}, the space {directions}")
        _check_same_space(existing, space, name)
        study = existing
    else:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                    load_if_exists=True)
    attrs = study.user_attrs
    # One record each: a kill between two leaves some set, so each missing one is set
    # (not all of them only when the first is missing).
    for key, value in (("space_file", str(Path(space.file).resolve())), ("space", space.name),
                       ("baseline", space.baseline),
                       ("objectives", [list(o) for o in space.objectives]),
                       ("constraints", [c[3] for c in space.constraints])):
        if key not in attrs:
            study.set_user_attr(key, value)
    study.set_user_attr("config", asdict(cfg))
    if space.baseline is not None and not study.get_trials(deepcopy=False):
        # A racing worker may enqueue it too: the copy is then deduplicated, not retrained.
        study.enqueue_trial({}, user_attrs={"role": "baseline"})
        if cfg.start not in STARTS:
            raise SearchError(f"start must be {' or '.join(STARTS)}, got {cfg.start!r}")
        # `--sampler random` is the comparison point for the samplers: random from trial 1.
        if cfg.start == "neighbourhood" and cfg.sampler != "random":
            # no more than the budget holds: an enqueued start trial past it would be
            # picked up and closed as "surplus", a trial the user did not ask for
            limit = min(cfg.startup_trials, cfg.trials - 1)
            for params in neighbourhood(space, limit, cfg.seed):
                study.enqueue_trial(params, user_attrs={"role": "start"})
    return study


def _check_same_space(study: optuna.Study, space: Space, name: str) -> None:
    """A study holds one space's trials: another space's would share its sampler history
    and its best block with them. A space is known by its name and its file's name, not
    the file's folder or content: machines sharing one study (PostgreSQL) each run their
    own copy of the file, and a file may be edited between runs."""
    attrs = study.user_attrs
    file, sp = attrs.get("space_file"), attrs.get("space")
    if file is None or sp is None:
        return
    if (Path(file).name, sp) != (Path(space.file).name, space.name):
        raise SearchError(
            f"study '{name}' searches space '{sp}' of {file}, not '{space.name}' of "
            f"{Path(space.file).resolve()}: name a new study (--study), or resume this one "
            "without a space")


def load_study_info(name: str, storage_url: str | None = None,
                    root: Path | None = None) -> tuple[optuna.Study, dict[str, Any]]:
    """Open an existing study (for `search show` and resuming without a space argument)."""
    if not storage_url:
        path = default_storage_path(name, root)
        if not path.exists():
            raise SearchError(f"no study '{name}' in {path.parent}/ (pass --storage for others)")
    elif not is_url(storage_url) and not os.path.lexists(Path(storage_url).expanduser()):
        # Reading must not create an empty journal where the user mistyped a path.
        raise SearchError(f"no such journal file: {storage_url}")
    storage = open_storage(storage_url, name, root=root)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise SearchError(f"no study named '{name}' in this storage") from None
    return study, dict(study.user_attrs)

