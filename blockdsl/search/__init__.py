"""Architecture search: a `.block` space's choices become Optuna suggestions, every trial
runs resolve -> lower -> (paired timing) -> train, and the winners are written back out as
`.block` text.

Design choices, each for a reason:
- Define-by-run: the resolver asks a `chooser` for each choice it meets, and the chooser is
  Optuna's `trial.suggest_*`. A choice inside a call that was not selected is never asked,
  so conditional choices need no bookkeeping; a variable holding a choice is one parameter.
- Identical architectures are trained once. The key is the sha256 of the canonical text
  (`render` of the bound Plan under a fixed name, comments dropped, plus any training
  hyper-parameter the space varies). Concurrent workers agree on who trains a repeated
  architecture with Lamport's bakery protocol over trial attributes (the storages offer no
  compare-and-swap); the others wait and copy the result.
- Constraints cost no training when the IR can decide them (params, FLOPs from
  `graph.report`), and only a short timing when it cannot. Step time is measured *paired*:
  candidate and baseline steps are interleaved in the same process, so load on a shared
  machine (and the thread count of the worker) cancels out of the ratio the constraint uses.
- Infeasible trials are COMPLETE with constraint values set (`Trial.set_constraint`), so TPE
  and NSGA-II learn where the feasible region is; their val_loss is the untrained model's
  (uniform prediction, ln V). The values are also written as the `constraints` list that
  optuna-dashboard reads (it does not read Optuna 5's per-name attributes).
- The start design is the baseline's neighbourhood: the space's point nearest the baseline
  (found by resolving alone) and its one-change neighbours are the first trials, instead of
  random points. In the default space random points are almost all slower than the
  baseline, so a short search that starts at random trains almost nothing; measured in
  docs/search.md. Long searches keep TPE's model of the whole space.
- Each trial trains for a fixed time budget (Brainformer: faster models take more steps) and
  reports validation loss at rungs (25%, 50%, 75%). By default the budget is converted to
  steps with the paired step-time ratio and the baseline's pace (`clock="paired"`), so a
  busy machine slows the search down but does not change its results; `clock="wall"` is
  the literal wall-clock rule. Single-objective studies prune with `RungPruner` (worse
  than the median of all trials at the rung); multi-objective studies, which Optuna's
  pruners do not cover, with `ParetoRungPruner`: at a rung a trial is stopped when another
  trial that reached the same rung is no worse in every objective and better in one (val
  loss at that rung, the rest known before training).
- Storage: Optuna's JournalStorage on a file by default (no server, append-only, survives
  SIGKILL: `blockdsl.search.journal` gives it a lock the kernel releases when its holder dies and
  repairs a record torn by a kill); any RDB URL (PostgreSQL) for many machines. A killed
  worker's trial is failed and re-enqueued: Optuna's heartbeat does this for RDB storages;
  for the journal (which has no heartbeat in Optuna 5) each trial records its worker (host,
  boot id, pid, start time) and a heartbeat attribute, and every worker reaps trials whose
  process is gone or whose heartbeat is older than the grace period.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from blockdsl.files import atomic_write
from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError, brief
from blockdsl.lang.expr import ChoiceDef, Scope, first_option
from blockdsl.lang.parse import load_module
from blockdsl.lang.resolve import eval_expr, merged, resolve
from blockdsl.plan import Plan

if TYPE_CHECKING:
    from optuna.storages import BaseStorage
    from torch import nn

# Metrics a space may minimize/maximize or constrain. Static ones are known from the Plan.
STATIC_METRICS, TIMED_METRICS = ir.STATIC_METRICS, ir.TIMED_METRICS
TRAINED_METRICS, METRICS = ir.TRAINED_METRICS, ir.METRICS
# Space variables with these names are training hyper-parameters (they may be choices).
TRAIN_VARIABLES = ("lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip")

DEFAULT_SPACE = "search/brainformer.block"
STUDY_DIR = Path("studies")
ATTR = "blockdsl:"  # prefix of the protocol's system attributes
MAX_RETRIES = 2

_FINAL_STATUSES = ("trained", "pruned", "infeasible", "failed")


class SearchError(Exception):
    """A problem the user can fix (space file, storage, study name)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.cli_message = message


class TrialFailed(Exception):
    """Raised inside a trial to record it as FAIL with a reason and go on."""


# ----------------------------------------------------------------------------- config


@dataclass
class SearchConfig:
    """Everything a search needs besides the space. The space's `budget ...(...)` line sets
    defaults; CLI flags / keyword arguments override them."""

    trials: int = 200
    seconds: float = 5.0  # training time per trial (excludes evaluation and timing)
    # "wall": train for `seconds` of wall-clock time (Brainformer's rule). "paired": train for
    # the steps the trial would take in `seconds` at its paired step-time ratio to the
    # baseline (same rule, but immune to load that changes between trials on a shared box).
    clock: str = "paired"
    pace: float | None = None  # paired clock: seconds per baseline step; None: its trial measures it
    # Paired clock: the baseline's training steps per trial, given directly (a block that
    # steps k times faster trains k times as many). None: `seconds / pace`. `seconds` with a
    # fixed pace is seconds *on the machine that measured the pace*, not here, which is
    # what a newcomer's `--seconds 3` taking 6 s showed; this says what it is.
    baseline_steps: int | None = None
    steps: int | None = None  # optional step cap per trial
    batch_size: int = 16
    seq_len: int | None = None  # None: the model's context
    eval_batches: int = 4
    rungs: int = 4  # evaluations at 1/rungs, 2/rungs, ... of the budget; prune at all but the last
    prune: bool = True
    prune_startup: int = 5  # trials that must have reached a rung before it prunes
    prune_quantile: float = 0.5  # single objective: stop when worse than this quantile at a rung
    prune_margin: float = 0.0  # multi-objective: loss must be worse by this much to be dominated
    timing_steps: int = 4  # timed steps per model in the paired timing (after 1 warm-up step)
    precision: str = "bf16"  # the CLI's one default for every command (cli_common.py says why)
    lr: float = 3e-3  # measured best of 2e-3..1.2e-2 for 100-250 steps of the default space
    warmup: int = 10
    weight_decay: float = 0.1
    seed: int = 0
    sampler: str = "auto"  # auto (TPE / NSGA-II), tpe, nsga2, random
    startup_trials: int = 10  # start-design trials before TPE models the space
    # "neighbourhood": the start design is one-change neighbours of the baseline (random
    # points fill in when there are too few); "random": Optuna's random start-up trials.
    start: str = "neighbourhood"
    population: int = 16  # NSGA-II population
    data: str | None = None  # None: default corpus (LM) or digits (classifier)
    device: str = "cpu"
    threads: int | None = 1  # torch threads per worker; None: leave torch's default
    heartbeat: int = 5  # seconds between heartbeats
    grace: int = 30  # a trial whose heartbeat is older than this is failed and retried
    tensorboard: str | None = None  # folder for TensorBoard event files, one subfolder a trial

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class Space:
    """A search space as the driver sees it: the parsed file plus its search directives."""

    module: ir.Module
    name: str
    file: str
    baseline: str | None
    objectives: list[tuple[str, str]]  # (metric, "minimize" | "maximize")
    constraints: list[tuple[str, str, ir.Expr, str]]  # (metric, op, bound, text)
    budget: dict[str, Any]
    task: str = "lm"

    @property
    def directions(self) -> list[str]:
        return [d for _, d in self.objectives]

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    @property
    def trained_metric(self) -> str | None:
        """The validation metric the trials train for (and pruning watches), if any."""
        for m, _ in self.objectives:
            if m in TRAINED_METRICS:
                return m
        for m, *_ in self.constraints:
            if m in TRAINED_METRICS:
                return m
        return None

    @property
    def needs_timing(self) -> bool:
        """Step time is measured when an objective or constraint names it, or when trials
        train (the rung schedule is set from it)."""
        return (self.trained_metric is not None
                or any(m == "step_time" for m, _ in self.objectives)
                or any(c[0] == "step_time" for c in self.constraints))

    def resolve(self, chooser: Callable[[ChoiceDef], Any] | None = None,
                assignment: dict[str, Any] | None = None) -> Plan:
        return resolve(self.module, self.name, assignment, chooser)

    def resolve_baseline(self) -> Plan:
        if self.baseline is None:
            raise SearchError(f"space '{self.name}' names no baseline (add `baseline MODEL`)")
        return resolve(self.module, self.baseline)


def _literal(e: Any) -> Any:
    if isinstance(e, ir.Call):
        raise BlockError("a budget argument takes a value, not a call", e.span)
    v = eval_expr(e, {})
    return str(v) if isinstance(v, str) else v


def load_space(path: str | Path, name: str | None = None) -> Space:
    """Parse a space file and read its objectives, constraints, baseline and budget."""
    p = Path(path)
    if not p.exists():
        raise SearchError(f"no such space file: {p}")
    module = load_module(p)
    spaces = [m.name for m in module.models if m.is_space and m.name in module.own_models]
    if name is None:
        if not spaces:
            raise SearchError(f"{p} defines no `space NAME {{ ... }}`")
        name = spaces[-1]
    if module.model(name) is None:
        raise SearchError(f"{p} has no space named '{name}' (spaces: {', '.join(spaces) or 'none'})")
    m = merged(module, name)
    # the metric names were checked by the parser (ir.METRICS), so `check` catches a typo
    objectives = [(o.metric, o.direction) for o in m.get("objectives", ())] or [("val_loss", "minimize")]
    constraints = []
    for c in m.get("constraints", ()):
        constraints.append((c.metric, c.op, c.bound, f"{c.metric} {c.op} {_expr_text(c.bound)}"))
    budget: dict[str, Any] = {}
    call = m.get("budget")
    if call is not None:
        for a in call.args:
            key = "batch_size" if a.name == "batch" else a.name
            if key not in SearchConfig.keys():
                raise BlockError(f"budget has no setting '{a.name}'", a.span,
                                 "known: " + ", ".join(sorted(SearchConfig.keys())))
            budget[key] = _literal(a.value)
            problem = setting_problem(key, budget[key])
            if problem:
                raise BlockError(f"budget setting {a.name}={brief(budget[key], 30)} {problem}",
                                 a.span, "the budget line sets the search's defaults")
    baseline = m.get("baseline")
    if baseline is not None and module.model(baseline) is None:
        raise SearchError(f"{p}: baseline '{baseline}' is not a model in the file or its includes")
    stem = m.get("stem")
    task = "classify" if stem is not None and stem.name == "patches" else "lm"
    return Space(module, name, str(p), baseline, objectives, constraints, budget, task)


def _expr_text(e: ir.Expr) -> str:
    if isinstance(e, ir.Num):
        return repr(e.value)
    if isinstance(e, ir.Name):
        return e.id
    if isinstance(e, ir.BinOp):
        return f"{_expr_text(e.left)} {e.op} {_expr_text(e.right)}"
    if isinstance(e, ir.Neg):
        return f"-{_expr_text(e.operand)}"
    return type(e).__name__


# Valid values of the numeric settings: (kind, low, low inclusive, high). A bad value from
# a flag or the budget line is the user's mistake, reported before anything runs: NaN
# seconds, a negative seed or batch size 0 otherwise surface as internal errors inside
# a trial, or as a "search" whose every trial fails. Seeds: NumPy's and Optuna's samplers
# take 0..2**32-1, and workers add their index to it.
_SETTINGS: dict[str, tuple[type, float, bool, float | None]] = {
    "trials": (int, 1, True, None), "seconds": (float, 0, False, None),
    "pace": (float, 0, False, None), "steps": (int, 1, True, None),
    "batch_size": (int, 1, True, None), "seq_len": (int, 1, True, None),
    "eval_batches": (int, 1, True, None), "rungs": (int, 1, True, None),
    "prune_startup": (int, 0, True, None), "prune_quantile": (float, 0, False, 1),
    "prune_margin": (float, 0, True, None), "timing_steps": (int, 1, True, None),
    "lr": (float, 0, False, None), "warmup": (int, 0, True, None),
    "weight_decay": (float, 0, True, None), "seed": (int, 0, True, 2**31 - 1),
    "startup_trials": (int, 0, True, None), "population": (int, 2, True, None),
    "threads": (int, 1, True, None), "heartbeat": (float, 0, False, None),
    "grace": (float, 0, False, None), "baseline_steps": (int, 1, True, None),
}
_CHOICES = {"clock": ("wall", "paired"), "sampler": ("auto", "tpe", "nsga2", "random"),
            "precision": ("fp32", "fp32-medium", "bf16"), "start": ("neighbourhood", "random")}


def setting_problem(key: str, v: Any) -> str | None:
    """Why `v` is no valid value of search setting `key` (None when it is valid)."""
    if v is None and key in ("pace", "steps", "seq_len", "threads", "data", "baseline_steps"):
        return None
    if key in _CHOICES:
        return None if v in _CHOICES[key] else f"must be one of {', '.join(_CHOICES[key])}"
    if key not in _SETTINGS:
        return None
    kind, low, inclusive, high = _SETTINGS[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        return "must be " + ("an integer" if kind is int else "a number")
    if not math.isfinite(v) or v < low or (v == low and not inclusive) or (high is not None and v > high):
        rng = f"{'>=' if inclusive else '>'} {low:g}" + (f" and <= {high}" if high is not None else "")
        return f"must be a finite number {rng}" if kind is float else f"must be an integer {rng}"
    return None


def make_config(space: Space, **overrides: Any) -> SearchConfig:
    """Defaults, then the space's budget line, then explicit overrides (None = not given).

    Every value is checked (`setting_problem`); the budget line's were checked, located,
    by `load_space`.
    """
    cfg = SearchConfig(**{k: v for k, v in space.budget.items()})
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - SearchConfig.keys()
    if unknown:
        raise TypeError(f"unknown search settings: {', '.join(sorted(unknown))}")
    for k, v in given.items():
        problem = setting_problem(k, v)
        if problem:
            flag = {"trials": "budget"}.get(k, k).replace("_", "-")
            raise SearchError(f"--{flag} {v!r}: {problem}")
    return replace(cfg, **given)


# ----------------------------------------------------------------------------- choices


OPTION_SUFFIX = "@option"


def suggest(trial: optuna.Trial, c: ChoiceDef) -> Any:
    """One choice of the space as an Optuna suggestion (names are the choice names).

    A categorical choice whose options are computed from another choice (`{2*d | 4*d}`
    with `d` a choice) has different values in every trial, which Optuna's categorical
    distribution cannot hold: it is suggested as the option's position instead, under the
    stable name `<choice>@option`, and the value is that option evaluated in this trial.
    """
    if c.kind == "categorical" and c.dynamic:
        i = trial.suggest_categorical(c.name + OPTION_SUFFIX, list(range(len(c.values))))
        return c.values[i]
    if c.kind == "categorical":
        values = [str(v) if isinstance(v, str) else v for v in c.values]
        return trial.suggest_categorical(c.name, values)
    if c.kind == "int":
        step = int(c.step) if c.step and not c.log else 1
        return trial.suggest_int(c.name, int(c.lo), int(c.hi), step=step, log=c.log)
    return trial.suggest_float(c.name, float(c.lo), float(c.hi),
                               step=None if c.log else c.step, log=c.log)


def bind_train_variables(space: Space, plan: Plan,
                         chooser: Callable[[ChoiceDef], Any] | None = None) -> dict[str, Any]:
    """The space's training hyper-parameters (`lr = {1e-4 .. 1e-2 log}` ...), bound.

    The model does not use them, so the resolver leaves them unbound; they are choices of
    the search all the same, asked here through the same chooser. They are evaluated by the
    language's one evaluator, so a range here is checked as one in the model is (an empty or
    non-positive log range is a located error), and the variables they read take the values
    the plan's choices took. A training variable itself is always put to the chooser, even
    when the plan's assignment names it (replaying an assignment goes through the chooser).
    """
    assigns = merged(space.module, space.name)["assigns"]
    bound = {k: v for k, v in plan.assignment.items() if k not in TRAIN_VARIABLES}
    scope = Scope(assigns, chooser or first_option, bound)
    return {name: scope.var(name, assigns[name].span) for name in TRAIN_VARIABLES if name in assigns}


def canonical_text(plan: Plan, train_vars: dict[str, Any] | None = None) -> str:
    """The architecture as text independent of choice names and file: render under a fixed
    name, comments dropped, plus the training hyper-parameters the space binds."""
    from blockdsl.lang.render import render

    body = [ln for ln in render(plan, name="candidate").splitlines() if not ln.startswith("#")]
    extra = [f"# train {k}={v!r}" for k, v in sorted((train_vars or {}).items())]
    return "\n".join(body + extra) + "\n"


def arch_hash(plan: Plan, train_vars: dict[str, Any] | None = None) -> str:
    return hashlib.sha256(canonical_text(plan, train_vars).encode()).hexdigest()[:20]


def arch_summary(plan: Plan) -> str:
    """One line: width, the stack and sharing, e.g. `d=64 (mha mlp topk)x3 (3 unique)`."""
    units: list[list[str]] = [[] for _ in range(plan.n_units)]
    for layer in plan.layers:
        units[layer.unit].append(layer.prim)
    parts: list[list[Any]] = []
    for u in units:
        text = " ".join(u)
        if parts and parts[-1][0] == text:
            parts[-1][1] += 1
        else:
            parts.append([text, 1])
    stack = " ".join(f"({t})" + (f"x{n}" if n > 1 else "") for t, n in parts)
    unique = len({layer.key for layer in plan.layers})
    shared = f" ({unique} unique)" if unique < len(plan.layers) else ""
    return f"d={plan.d} {stack}{shared}"


# ----------------------------------------------------------------------------- storage


def default_storage_path(study: str, root: Path | None = None) -> Path:
    return (root or STUDY_DIR) / f"{study}.journal"


def open_storage(url: str | None, study: str, cfg: SearchConfig | None = None,
                 root: Path | None = None) -> BaseStorage:
    """A journal file (default `studies/<study>.journal`, or a path), or an RDB URL."""
    cfg = cfg or SearchConfig()
    if url and "://" in url:
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
    """RDBStorage with Optuna's heartbeat; a stale trial is retried by `_retry_stale_trial`.

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
                    heartbeat_stale_trial_callback=_retry_stale_trial,
                )
        except ImportError as e:
            raise SearchError(f"storage {url.split('://')[0]}: a driver is missing ({e}); for "
                              "PostgreSQL: pip install 'blockdsl[postgres]'") from None
        except Exception as e:  # noqa: BLE001 - sqlalchemy's many connection errors
            racing = "already exists" in str(e) or "duplicate" in str(e).lower()
            if not racing or attempt == attempts - 1:
                raise SearchError(
                    f"cannot open storage {_redact(url)}: {str(e).splitlines()[0]}") from None
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


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _is_journal(storage: BaseStorage) -> bool:
    from optuna.storages import JournalStorage

    return isinstance(storage, JournalStorage)


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
        if cfg.start not in ("neighbourhood", "random"):
            raise SearchError(f"start must be neighbourhood or random, got {cfg.start!r}")
        # `--sampler random` is the comparison point for the samplers: random from trial 1.
        if cfg.start == "neighbourhood" and cfg.sampler != "random":
            # no more than the budget holds: an enqueued start trial past it would be
            # picked up and closed as "surplus", a trial the user did not ask for
            limit = min(cfg.startup_trials, cfg.trials - 1)
            for params in neighbourhood(space, limit, cfg.seed):
                study.enqueue_trial(params, user_attrs={"role": "start"})
    return study


def load_study_info(name: str, storage_url: str | None = None,
                    root: Path | None = None) -> tuple[optuna.Study, dict[str, Any]]:
    """Open an existing study (for `search show` and resuming without a space argument)."""
    if not storage_url:
        path = default_storage_path(name, root)
        if not path.exists():
            raise SearchError(f"no study '{name}' in {path.parent}/ (pass --storage for others)")
    elif "://" not in storage_url and not os.path.lexists(Path(storage_url).expanduser()):
        # Reading must not create an empty journal where the user mistyped a path.
        raise SearchError(f"no such journal file: {storage_url}")
    storage = open_storage(storage_url, name, root=root)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise SearchError(f"no study named '{name}' in this storage") from None
    return study, dict(study.user_attrs)


# ----------------------------------------------------------------------------- workers


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


def _retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Re-enqueue a trial whose worker died (same params, same role), up to MAX_RETRIES."""
    retries = int(trial.user_attrs.get("retries", 0))
    if retries >= MAX_RETRIES:
        return
    attrs: dict[str, Any] = {"retry_of": trial.number, "retries": retries + 1}
    if "role" in trial.user_attrs:
        attrs["role"] = trial.user_attrs["role"]
    study.enqueue_trial(dict(trial.params), user_attrs=attrs, skip_if_exists=False)


def reap_stale(study: optuna.Study, grace: float) -> list[int]:
    """Fail (and re-enqueue) RUNNING trials whose worker is gone; returns their numbers.

    A local worker is gone when its process is; a remote one when its heartbeat (journal:
    our attribute; RDB: Optuna's own, handled by Optuna) is older than `grace` seconds.
    """
    storage = study._storage
    journal = _is_journal(storage)
    if not journal:
        # Optuna's own heartbeat check (it runs when a trial starts; a worker waiting on a
        # repeated architecture must not wait forever on a dead remote owner either).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    now = time.time()
    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.system_attrs.get(ATTR + "worker")
        reason = None
        if w is not None and _process_gone(w):
            reason = f"worker process {w['pid']} on {w['host']} is gone"
        elif journal:
            beat = t.system_attrs.get(ATTR + "heartbeat")
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if beat is not None and now - float(beat) > grace:
                reason = f"no heartbeat for {now - float(beat):.0f}s"
        if reason is None:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"worker lost: {reason}")
            storage.set_trial_user_attr(t._trial_id, "status", "lost")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (UpdateFinishedTrialError, RuntimeError):
            continue  # another worker reaped it first (or it just finished)
        _retry_stale_trial(study, storage.get_trial(t._trial_id))
        lost.append(t.number)
    return lost


def counted_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Trials that use up the budget: all but those replaced by a retry and surplus ones."""
    replaced = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return [t for t in trials if t.number not in replaced and t.user_attrs.get("status") != "surplus"]


def budget_done(study: optuna.Study, budget: int) -> bool:
    trials = counted_trials(study.get_trials(deepcopy=False))
    waiting = any(t.state == TrialState.WAITING for t in trials)
    return len(trials) >= budget and not waiting


class _Heartbeat:
    """Writes `blockdsl:heartbeat` on a trial every few seconds (journal storage only)."""

    def __init__(self, storage: BaseStorage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.set_trial_system_attr(self.trial_id, ATTR + "heartbeat", time.time())
            except Exception:  # noqa: BLE001 - the trial finished or the file is busy
                return

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


# ----------------------------------------------------------------------------- dedup


def _same_hash(study: optuna.Study, h: str, me: int) -> list[FrozenTrial]:
    return [t for t in study._storage.get_all_trials(study._study_id, deepcopy=False)
            if t._trial_id != me and t.system_attrs.get(ATTR + "hash") == h]


def _result_of(t: FrozenTrial) -> bool:
    """A finished trial holding a result for its architecture (not a lost/surplus one)."""
    return t.state.is_finished() and t.user_attrs.get("status") in _FINAL_STATUSES + ("copy",)


def claim_architecture(study: optuna.Study, trial: optuna.Trial, h: str,
                       poll: float = 0.3, on_wait: Callable[[], None] | None = None
                       ) -> FrozenTrial | None:
    """Decide whether this trial trains architecture `h` or copies an earlier result.

    Lamport's bakery over trial attributes, scoped to one hash: take a ticket one above
    every ticket seen for `h`, then wait while a same-hash trial is choosing its ticket or
    holds a smaller (ticket, number). The winner trains; when it finishes, the waiters see
    its result and copy it. A dead winner is reaped (failed) and stops blocking. Returns
    the trial to copy, or None to train.
    """
    storage, tid = study._storage, trial._trial_id
    storage.set_trial_system_attr(tid, ATTR + "choosing", h)
    storage.set_trial_system_attr(tid, ATTR + "hash", h)
    others = _same_hash(study, h, tid)
    done = [t for t in others if _result_of(t)]
    if done:
        storage.set_trial_system_attr(tid, ATTR + "choosing", None)
        return min(done, key=lambda t: t.number)
    ticket = 1 + max((int(t.system_attrs.get(ATTR + "ticket") or 0) for t in others), default=0)
    storage.set_trial_system_attr(tid, ATTR + "ticket", ticket)
    storage.set_trial_system_attr(tid, ATTR + "choosing", None)
    mine = (ticket, trial.number)
    while True:
        others = _same_hash(study, h, tid)
        done = [t for t in others if _result_of(t)]
        if done:
            return min(done, key=lambda t: t.number)
        blockers = []
        for t in others:
            if t.state != TrialState.RUNNING:
                continue
            if t.system_attrs.get(ATTR + "choosing") == h:
                blockers.append(t)
                continue
            tk = t.system_attrs.get(ATTR + "ticket")
            if tk is not None and (int(tk), t.number) < mine:
                blockers.append(t)
        if not blockers:
            return None
        if on_wait is not None:
            on_wait()
        time.sleep(poll)


# ----------------------------------------------------------------------------- pruning


def dominates(a: Sequence[float], b: Sequence[float], margin0: float = 0.0) -> bool:
    """a dominates b (all minimised): no worse everywhere, better somewhere; the first
    coordinate (the rung's loss) must be better by at least `margin0` to count."""
    if a[0] > b[0] - margin0:
        return False
    return all(x <= y for x, y in zip(a[1:], b[1:])) and (
        a[0] < b[0] or any(x < y for x, y in zip(a[1:], b[1:])))


class RungPruner(optuna.pruners.BasePruner):
    """Single-objective pruning at rungs, asynchronous successive halving style.

    At rung r a trial is stopped when its value is worse than the `quantile` of the values
    every other trial reported at rung r (finished, pruned or still running; repeats of an
    architecture counted once), once at least `startup` trials reached it. Unlike Optuna's
    MedianPruner this neither counts trials that never trained (infeasible, copies) as
    start-up trials nor compares only against the survivors that completed.
    """

    def __init__(self, startup: int = 5, quantile: float = 0.5):
        self.startup, self.quantile = startup, quantile

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        refs = sorted(t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                      if t.number != trial.number and step in t.intermediate_values
                      and t.user_attrs.get("status") != "copy")
        if len(refs) < self.startup:
            return False
        if study.direction.name == "MAXIMIZE":
            refs, value = [-v for v in reversed(refs)], -value
        k = min(len(refs) - 1, int(self.quantile * (len(refs) - 1) + 0.5))
        return value > refs[k]


class ParetoRungPruner:
    """Pruning for multi-objective studies (Optuna's pruners are single-objective only).

    Every trial records the trained metric at each rung (`rungs` user attribute). At rung r a
    trial is pruned when at least `startup` other trials reached rung r and one of them
    dominates it on (metric at rung r, every objective known before training). Objectives
    known before training (params, FLOPs, step time) cannot improve with training, so such a
    trial is unlikely to reach the final Pareto front; the margin guards against noise.
    """

    def __init__(self, startup: int = 5, margin: float = 0.0):
        self.startup, self.margin = startup, margin

    def should_prune(self, point: Sequence[float], rung: int,
                     others: Iterable[FrozenTrial], sign: float = 1.0) -> bool:
        """`point` = [sign * metric at this rung, *pre-training objectives], all minimised."""
        refs = []
        for t in others:
            r = (t.user_attrs.get("rungs") or {}).get(str(rung))
            static = t.user_attrs.get("pre_values")
            if r is None or static is None or len(static) != len(point) - 1:
                continue
            refs.append([sign * float(r)] + [float(v) for v in static])
        if len(refs) < self.startup:
            return False
        return any(dominates(ref, point, self.margin) for ref in refs)


# ----------------------------------------------------------------------------- timing


def _train_step(model: nn.Module, opt: Any, x: Any, y: Any, precision: str, device: Any) -> None:
    import torch

    from blockdsl.train import accumulate_gradients

    accumulate_gradients(model, x, y, 1, precision, device)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepTimes:
    """Seconds per training step: medians of wall clock and this process's CPU time, and the
    fastest step (the least disturbed by other load)."""

    cand: float
    ref: float
    cand_cpu: float
    ref_cpu: float
    cand_min: float = 0.0
    ref_min: float = 0.0

    @property
    def ratio(self) -> float:
        return self.cand / self.ref


def paired_step_times(model: nn.Module, ref: nn.Module | None, batch: tuple[Any, Any],
                      precision: str, steps: int = 4, warmup: int = 1,
                      stop_ratio: float | None = None) -> StepTimes:
    """Seconds per training step of `model` and of `ref`, their steps interleaved.

    Interleaving makes the ratio robust to load that changes over seconds (a shared
    machine, another worker). With `stop_ratio`, timing stops after two pairs once even
    the candidate's fastest step is slower than `stop_ratio` times the reference's slowest:
    a clearly infeasible candidate costs three steps, not the full count. The candidate's
    weights are restored afterwards, so timing does not train it.
    """
    import torch

    device = next(model.parameters()).device
    x, y = batch[0].to(device), batch[1].to(device)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    models = [model] + ([ref] if ref is not None else [])
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]
    wall: list[list[float]] = [[] for _ in models]
    cpu: list[list[float]] = [[] for _ in models]
    try:
        for i in range(warmup + steps):
            order = list(range(len(models)))
            for j in (order if i % 2 == 0 else order[::-1]):
                t0, c0 = time.perf_counter(), time.process_time()
                _train_step(models[j], opts[j], x, y, precision, device)
                if i >= warmup:
                    wall[j].append(time.perf_counter() - t0)
                    cpu[j].append(time.process_time() - c0)
            if (stop_ratio is not None and ref is not None and len(wall[0]) >= 2
                    and min(wall[0]) > stop_ratio * max(wall[1])):
                break
    finally:
        model.load_state_dict(saved)
        for m in models:
            m.zero_grad(set_to_none=True)

    def med(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    j = 1 if ref is not None else 0
    return StepTimes(med(wall[0]), med(wall[j]), med(cpu[0]), med(cpu[j]), min(wall[0]), min(wall[j]))


# ----------------------------------------------------------------------------- the worker


def _violation(value: float, op: str, bound: float) -> float:
    """Optuna's convention: <= 0 feasible. Relative to the bound, so units do not matter."""
    scale = abs(bound) if bound else 1.0
    if op in ("<=", "<"):
        return (value - bound) / scale
    return (bound - value) / scale


Event = Callable[[str, dict[str, Any]], None]


class Worker:
    """Runs trials of one study until its budget is used: the unit `--workers N` starts N of."""

    def __init__(self, space: Space, study: optuna.Study, cfg: SearchConfig,
                 on_event: Event | None = None, index: int = 0):
        self.space, self.study, self.cfg = space, study, cfg
        self.on_event = on_event or (lambda kind, info: None)
        self.identity = worker_identity()
        self._data: Any = None
        self._ref: nn.Module | None = None
        self._ref_report: Any = None
        self._vars: dict[str, Any] = {}
        self._pace = 0.05
        self.stop_requested = False
        self.pruner = ParetoRungPruner(cfg.prune_startup, cfg.prune_margin)
        offset = 1000 * index + len(study.get_trials(deepcopy=False))
        self.sampler = make_sampler(space, cfg, offset)
        study.sampler = self.sampler
        study.pruner = (RungPruner(cfg.prune_startup, cfg.prune_quantile)
                        if not space.multi and cfg.prune else optuna.pruners.NopPruner())
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)

    # -- the loop
    def run(self, max_trials: int | None = None) -> int:
        """Run trials until the study's budget is used (or `max_trials` here); returns count."""
        n = 0
        while not self.stop_requested and (max_trials is None or n < max_trials):
            for number in reap_stale(self.study, self.cfg.grace):
                self.on_event("reaped", {"number": number})
            if budget_done(self.study, self.cfg.trials):
                break
            self.study.optimize(self.objective, n_trials=1, catch=(TrialFailed,),
                                gc_after_trial=False, show_progress_bar=False)
            n += 1
        return n

    # -- shared state built lazily
    def _dataset(self, model: nn.Module) -> Any:
        if self._data is None:
            from blockdsl.train import data as data_mod

            self._data = data_mod.load_for_model(model, self.cfg.data, self.cfg.seq_len)
        return self._data

    def _build(self, plan: Plan) -> nn.Module:
        from blockdsl.lower import build_from_plan
        from blockdsl.train import seed_everything

        seed_everything(self.cfg.seed)
        return build_from_plan(plan, device=self.cfg.device, precision=self.cfg.precision)

    def _reference(self) -> tuple[nn.Module | None, Any]:
        """The baseline, built once per worker: the partner of every paired timing."""
        if self.space.baseline is None:
            return None, None
        if self._ref is None:
            from blockdsl.graph import report

            try:
                plan = self.space.resolve_baseline()
            except BlockError as e:
                raise SearchError(f"baseline '{self.space.baseline}': {e.format()}") from None
            self._ref_report = report(plan)
            self._ref = self._build(plan)
        return self._ref, self._ref_report

    # -- one trial
    def objective(self, trial: optuna.Trial) -> float | list[float]:
        storage = self.study._storage
        storage.set_trial_system_attr(trial._trial_id, ATTR + "worker", self.identity)
        hb = _Heartbeat(storage, trial._trial_id, self.cfg.heartbeat) if _is_journal(storage) \
            else contextlib.nullcontext()
        with hb:
            try:
                return self._objective(trial)
            except KeyboardInterrupt:
                # Stopped by the user mid-trial: run it again on resume.
                self.stop_requested = True
                trial.set_user_attr("status", "interrupted")
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C); re-enqueued")
                _retry_stale_trial(self.study, storage.get_trial(trial._trial_id))
                raise

    def _fail(self, trial: optuna.Trial, reason: str, status: str = "failed") -> TrialFailed:
        trial.set_user_attr("status", status)
        trial.set_user_attr("fail_reason", reason[:500])
        self.on_event("failed", {"number": trial.number, "reason": reason})
        return TrialFailed(reason)

    def _objective(self, trial: optuna.Trial) -> float | list[float]:
        cfg, space = self.cfg, self.space
        trials = self.study.get_trials(deepcopy=False)
        before = [t for t in counted_trials(trials) if t.number < trial.number]
        if len(before) >= cfg.trials:
            raise self._fail(trial, "budget already used by other workers", "surplus")
        role = trial.user_attrs.get("role")
        is_base = role == "baseline"
        self.on_event("start", {"number": trial.number, "role": role})

        # 1. bind the choices (Optuna's suggest is the resolver's chooser)
        try:
            plan = space.resolve_baseline() if is_base else space.resolve(
                chooser=lambda c: suggest(trial, c))
        except BlockError as e:
            raise self._fail(trial, f"resolve: {e.message}") from None
        except ValueError as e:  # a choice Optuna cannot express
            raise self._fail(trial, f"choice: {e}") from None
        from blockdsl.lang.render import render

        try:
            self._vars = {} if is_base else bind_train_variables(
                space, plan, lambda c: suggest(trial, c))
        except (BlockError, ValueError) as e:
            raise self._fail(trial, f"training variables: {e}") from None
        h = arch_hash(plan, self._vars)
        if self._vars:
            trial.set_user_attr("train_vars", self._vars)
        trial.set_user_attr("arch_hash", h)
        trial.set_user_attr("arch", arch_summary(plan))
        trial.set_user_attr("block", render(plan, name=f"{space.name}_t{trial.number}"))
        self.on_event("arch", {"number": trial.number, "arch": arch_summary(plan)})

        # 2. never train an architecture twice
        src = claim_architecture(self.study, trial, h,
                                 on_wait=lambda: reap_stale(self.study, cfg.grace))
        if src is not None:
            return self._copy(trial, src)

        # 3. what the IR tells without torch
        from blockdsl.graph import report

        metrics = _static_metrics(report(plan))
        for k, v in metrics.items():
            trial.set_user_attr(k, v)
        ref_model, ref_rep = self._reference()
        base = _static_metrics(ref_rep) if ref_rep is not None else {}
        violations = self._violations(metrics, base)
        if violations and not is_base:
            return self._infeasible(trial, plan, metrics, base, violations)

        # 4. build; time against the baseline (paired), which also sets the rung schedule
        try:
            model = self._build(plan)
        except Exception as e:  # noqa: BLE001 - a lowering error is the candidate's fault
            raise self._fail(trial, f"lowering: {type(e).__name__}: {e}") from None
        t_cand = 0.0
        if space.needs_timing:
            self.on_event("timing", {"number": trial.number})
            try:
                batch = self._dataset(model).train_batch(0, cfg.batch_size, cfg.seed)
                times = paired_step_times(
                    model, None if is_base else ref_model, batch, cfg.precision,
                    cfg.timing_steps * (2 if is_base else 1), stop_ratio=self._stop_ratio())
            except Exception as e:  # noqa: BLE001 - e.g. out of memory
                raise self._fail(trial, _error_reason(e)) from None
            if is_base:
                self._record_baseline_time(times)
            t_cand, ratio = times.cand, times.ratio
            self._pace = self._baseline_pace(times)
            ref_time = self._baseline_step_time(times.ref)
            metrics["step_time"], base["step_time"] = ratio * ref_time, ref_time
            trial.set_user_attr("step_time", metrics["step_time"])
            trial.set_user_attr("step_time_ratio", ratio)
            trial.set_user_attr("step_time_measured", t_cand)
            violations = self._violations(metrics, base)
            if violations and not is_base:
                return self._infeasible(trial, plan, metrics, base, violations)

        # 5. train for the fixed budget, reporting rungs
        if space.trained_metric is not None:
            metrics.update(self._train(trial, model, t_cand or 0.05, metrics, base))
        violations = self._violations(metrics, base)
        self._set_constraints(trial, metrics, base)
        trial.set_user_attr("status", "trained")
        if violations:
            trial.set_user_attr("infeasible", "; ".join(violations))
        self.on_event("done", {"number": trial.number, "metrics": metrics})
        return self._values(metrics)

    def _stop_ratio(self) -> float | None:
        """Give up timing a candidate 25% past the tightest `step_time <= c * baseline`."""
        cs = [float(eval_expr(bound, {"baseline": 1.0})) for m, op, bound, _ in self.space.constraints
              if m == "step_time" and op in ("<=", "<") and _uses_baseline(bound)]
        return 1.25 * min(cs) if cs else None

    def _values(self, metrics: dict[str, float]) -> float | list[float]:
        vals = [float(metrics[m]) for m, _ in self.space.objectives]
        return vals[0] if len(vals) == 1 else vals

    def _bound(self, bound: ir.Expr, base: float | None, text: str) -> float:
        if base is None and _uses_baseline(bound):
            raise SearchError(f"constraint `{text}` uses the baseline, but the space names none")
        return float(eval_expr(bound, {"baseline": base} if base is not None else {}))

    def _violations(self, metrics: dict[str, float], base: dict[str, float]) -> list[str]:
        """Constraints violated by the metrics known so far (the others are not judged yet)."""
        out = []
        for metric, op, bound, text in self.space.constraints:
            if metric not in metrics:
                continue
            b = self._bound(bound, base.get(metric), text)
            v = metrics[metric]
            if _violation(v, op, b) > 0 or (op in ("<", ">") and v == b):
                out.append(f"{text}: {_fmt(v)} vs {_fmt(b)}")
        return out

    def _set_constraints(self, trial: optuna.Trial, metrics: dict[str, float],
                         base: dict[str, float]) -> None:
        """Every constraint gets a value (Optuna: <= 0 feasible); unmeasured ones count as met."""
        values = []
        for metric, op, bound, text in self.space.constraints:
            if metric in metrics:
                v = _violation(metrics[metric], op, self._bound(bound, base.get(metric), text))
            else:
                v = 0.0
            values.append((text, v))
        write_constraints(trial, values)

    def _infeasible(self, trial: optuna.Trial, plan: Plan, metrics: dict[str, float],
                    base: dict[str, float], violations: list[str]) -> float | list[float]:
        """COMPLETE with constraint values set, so the sampler learns; no training spent."""
        self._set_constraints(trial, metrics, base)
        m = dict(metrics)
        n = plan.vocab if plan.task == "lm" else plan.head[1].get("classes", 2)
        for k in TRAINED_METRICS:  # an untrained model predicts uniformly
            m[k] = 0.0 if k == "val_acc" else math.log(max(2, n))
        m["val_bpb"] = m["val_loss"] / math.log(2)
        m.setdefault("step_time", 10.0 * float(self.study.user_attrs.get("baseline_step_time") or 1))
        trial.set_user_attr("status", "infeasible")
        trial.set_user_attr("infeasible", "; ".join(violations))
        self.on_event("infeasible", {"number": trial.number, "reason": "; ".join(violations)})
        return self._values(m)

    def _baseline_step_time(self, local: float) -> float:
        """The baseline's step time as its trial recorded it; before that, this measurement."""
        v = self.study.user_attrs.get("baseline_step_time")
        return float(v) if v else float(local)

    def _record_baseline_time(self, t: StepTimes) -> None:
        if not self.study.user_attrs.get("baseline_step_time"):
            # The fastest timed step: the figure least inflated by other load on the machine.
            self.study.set_user_attr("baseline_step_time", t.cand_min)
            self.study.set_user_attr("baseline_step_min", t.cand_min)

    def _baseline_pace(self, t: StepTimes) -> float:
        """Seconds per baseline step that `clock="paired"` turns the time budget into steps with.

        `pace` in the config (the space's budget line) fixes it: step budgets, and so results,
        then do not depend on the machine's load at all, and two studies (say, two samplers)
        train with the same budgets. Otherwise the study's baseline trial measures it, as its
        fastest timed step: other load only ever adds time, so the minimum is the estimate
        least inflated by whatever ran beside it.
        """
        if self.cfg.pace:
            return float(self.cfg.pace)
        v = self.study.user_attrs.get("baseline_step_min")
        return float(v) if v else t.ref_min

    def _var(self, name: str, default: Any) -> Any:
        """A training hyper-parameter: the space's variable of that name if it binds one."""
        v = self._vars.get(name)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    def _train(self, trial: optuna.Trial, model: nn.Module, step_time: float,
               metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        from blockdsl.train import TrainConfig, TrainError, train

        cfg, space = self.cfg, self.space
        metric = space.trained_metric or "val_loss"
        signs = {m: (-1.0 if d == "maximize" else 1.0) for m, d in space.objectives}
        sign = signs.get(metric, -1.0 if metric == "val_acc" else 1.0)
        if cfg.clock == "paired":
            # A candidate measured >20x faster than the baseline is a timing glitch, not a
            # block; and a wall-clock guard of 10x the budget stops a trial whose step
            # budget came out absurd (a busy machine legitimately slows trials, not 10x).
            ratio = max(0.05, float(trial.user_attrs.get("step_time_ratio") or 1.0))
            # The pace as the study knows it now: a worker that started after the baseline
            # ran (a resumed or second worker) must not fall back to its initial guess.
            pace = float(cfg.pace or self.study.user_attrs.get("baseline_step_min") or self._pace)
            base_steps = cfg.baseline_steps or cfg.seconds / pace
            steps = max(1, round(base_steps / ratio))
            seconds = 10.0 * base_steps * pace  # the wall-clock guard
            trial.set_user_attr("step_budget", steps)
            if cfg.steps:
                steps = min(steps, cfg.steps)
            spr = max(1, round(steps / cfg.rungs))
            by_steps = True
        elif cfg.clock == "wall":
            steps, seconds = cfg.steps, cfg.seconds
            spr = max(1, round(cfg.seconds / cfg.rungs / max(step_time, 1e-4)))
            by_steps = seconds is None
        else:
            raise SearchError(f"clock must be wall or paired, got {cfg.clock!r}")
        tcfg = TrainConfig(
            data=cfg.data, steps=steps, seconds=seconds, batch_size=cfg.batch_size,
            seq_len=cfg.seq_len, lr=float(self._var("lr", cfg.lr)),
            warmup=int(self._var("warmup", cfg.warmup)),
            weight_decay=float(self._var("weight_decay", cfg.weight_decay)),
            min_lr_ratio=float(self._var("min_lr_ratio", 0.1)),
            grad_clip=float(self._var("grad_clip", 1.0)),
            precision=cfg.precision, eval_every=spr, eval_batches=cfg.eval_batches,
            log_every=spr, seed=cfg.seed, out=None, device=cfg.device, quiet=True,
            progress=False,
            tensorboard=(Path(cfg.tensorboard) / f"trial-{trial.number:04d}"
                         if cfg.tensorboard else None),
        )
        rungs: dict[str, float] = {}
        pre = [signs[m] * metrics.get(m, 0.0) for m, _ in space.objectives if m not in TRAINED_METRICS]
        trial.set_user_attr("pre_values", pre)
        prune = cfg.prune and trial.user_attrs.get("role") != "baseline"

        def on_eval(step: int, m: dict[str, float]) -> bool:
            v = m.get(metric)
            if v is None:
                return False
            if math.isnan(v):
                raise TrialFailed("NaN validation loss")
            # The paired clock's budget is its steps (its `seconds` is only the runaway guard,
            # 10x the budget: progress measured against it put every eval at rung 1, so
            # trials were never compared at 50% and 75%); the wall clock's is its seconds.
            progress = step / steps if by_steps else m["train_seconds"] / seconds
            if step == 0 or progress >= 0.999:
                return False
            rung = max(1, min(cfg.rungs - 1, round(progress * cfg.rungs)))
            if str(rung) in rungs:
                return False
            rungs[str(rung)] = v
            trial.set_user_attr("rungs", dict(rungs))
            self.on_event("rung", {"number": trial.number, "rung": rung, "value": v})
            if not space.multi:
                trial.report(v, rung)
                if prune and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at rung {rung}")
            elif prune:
                others = [t for t in self.study.get_trials(deepcopy=False)
                          if t.number != trial.number]
                if self.pruner.should_prune([sign * v] + pre, rung, others, sign):
                    raise optuna.TrialPruned(f"pruned at rung {rung}")
            return False

        self.on_event("train", {"number": trial.number, "seconds": cfg.seconds})
        t0 = time.perf_counter()
        try:
            res = train(model, tcfg, dataset=self._dataset(model), on_eval=on_eval)
        except optuna.TrialPruned:
            trial.set_user_attr("status", "pruned")
            trial.set_user_attr("train_wall", time.perf_counter() - t0)
            self._set_constraints(trial, metrics, base)
            self.on_event("pruned", {"number": trial.number, "rungs": rungs})
            raise
        except TrialFailed as e:
            raise self._fail(trial, str(e)) from None
        except TrainError as e:
            raise self._fail(trial, f"train: {e}") from None
        except Exception as e:  # noqa: BLE001 - OOM, a kernel error, a primitive's bug
            raise self._fail(trial, _error_reason(e)) from None
        if res.stopped_by == "interrupt":
            self.stop_requested = True
            _retry_stale_trial(self.study, self.study._storage.get_trial(trial._trial_id))
            raise self._fail(trial, "interrupted (Ctrl-C); re-enqueued", "interrupted")
        out = {k: float(res.val[k]) for k in TRAINED_METRICS if k in res.val}
        if not out or any(math.isnan(v) for v in out.values()) or math.isnan(res.train_loss):
            raise self._fail(trial, "NaN loss")
        trial.set_user_attr("steps", res.steps)
        trial.set_user_attr("train_seconds", res.train_seconds)
        trial.set_user_attr("train_wall", time.perf_counter() - t0)
        trial.set_user_attr("train_step_time", res.train_seconds / max(1, res.steps))
        for k, v in out.items():
            trial.set_user_attr(k, v)
        return out

    def _copy(self, trial: optuna.Trial, src: FrozenTrial) -> float | list[float]:
        """Reuse an earlier result for the same architecture: no build, no training."""
        orig = src
        if src.user_attrs.get("status") == "copy":
            st = self.study._storage
            orig = st.get_trial(st.get_trial_id_from_study_id_trial_number(
                self.study._study_id, int(src.user_attrs["copy_of"])))
        status = orig.user_attrs.get("status")
        trial.set_user_attr("copy_of", orig.number)
        trial.set_user_attr("copied_status", status)
        for k in ("params", "active_params", "flops", "step_time", "step_time_ratio", "rungs",
                  "pre_values", "infeasible", "fail_reason", "steps", *TRAINED_METRICS):
            if k in orig.user_attrs:
                trial.set_user_attr(k, orig.user_attrs[k])
        write_constraints(trial, [(k, v) for k, v in orig.constraints.items()
                                  if not k.isdigit()])  # the list form is rebuilt from these
        self.on_event("copy", {"number": trial.number, "of": orig.number, "status": status})
        trial.set_user_attr("status", "copy")
        if orig.state == TrialState.FAIL:
            raise TrialFailed(f"copy of failed trial {orig.number}")
        if orig.state == TrialState.PRUNED:
            if not self.space.multi:
                for step, v in sorted(orig.intermediate_values.items()):
                    trial.report(v, step)
            raise optuna.TrialPruned(f"copy of pruned trial {orig.number}")
        vals = orig.values
        return vals[0] if len(vals) == 1 else list(vals)


DASHBOARD_CONSTRAINTS = "constraints"


def write_constraints(trial: optuna.Trial, values: Sequence[tuple[str, float]]) -> None:
    """Constraint values (<= 0 feasible) in both forms readers use.

    Optuna 5's `set_constraint` stores one `constraints:<name>` system attribute each, which
    its samplers read; optuna-dashboard (0.21) reads only the older `constraints` attribute,
    a list of floats, and without it shows an infeasible trial as an ordinary completed
    result. So the list (in the space's constraint order) is written too. Optuna reads
    both forms into `trial.constraints` (the list as keys "0", "1", ...): every value
    appears twice there, which changes neither feasibility nor the order of violation
    sums its samplers rank infeasible trials by.
    """
    for name, v in values:
        trial.set_constraint(name, v)
    if values:
        trial.storage.set_trial_system_attr(trial._trial_id, DASHBOARD_CONSTRAINTS,
                                            [float(v) for _, v in values])


def _static_metrics(rep: Any) -> dict[str, float]:
    return {"params": float(rep.stored_params), "active_params": float(rep.active_params_per_token),
            "flops": float(rep.flops_per_token)}


def _uses_baseline(e: Any) -> bool:
    if isinstance(e, ir.Name):
        return e.id == "baseline"
    if isinstance(e, ir.BinOp):
        return _uses_baseline(e.left) or _uses_baseline(e.right)
    if isinstance(e, (ir.Neg,)):
        return _uses_baseline(e.operand)
    if isinstance(e, ir.Func):
        return any(_uses_baseline(a) for a in e.args)
    return False


def _error_reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
        return f"out of memory: {text}"
    return text


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.2f}M"
    if a >= 1e3:
        return f"{v / 1e3:.1f}K"
    if a >= 1 or a == 0:
        return f"{v:.3g}"
    return f"{v:.3g}"


# ----------------------------------------------------------------------------- samplers


class _StudyView:
    """The study as a sampler should see it: without the baseline trial, which is no point
    of the space (it has no parameters and would empty NSGA-II's intersection space)."""

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    @staticmethod
    def _keep(t: FrozenTrial) -> bool:
        return t.user_attrs.get("role") != "baseline"

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return [t for t in self._study._get_trials(*args, **kwargs) if self._keep(t)]

    def get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(*args, **kwargs) if self._keep(t)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class BaselineBlindSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that it never learns from (or crosses over with) the baseline."""

    def __init__(self, base: optuna.samplers.BaseSampler):
        self.base = base

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self.base.infer_relative_search_space(_StudyView(study), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        if trial.user_attrs.get("role") == "baseline":
            return {}
        return self.base.sample_relative(_StudyView(study), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, name: str,
                           distribution: Any) -> Any:
        return self.base.sample_independent(_StudyView(study), trial, name, distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(_StudyView(study), trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.base.after_trial(_StudyView(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def make_sampler(space: Space, cfg: SearchConfig, offset: int = 0) -> optuna.samplers.BaseSampler:
    """TPE (single objective) or NSGA-II (several), blind to the baseline trial.

    `offset` shifts the seed: parallel workers (and a resumed run) must not replay one
    random sequence, or they would propose the same points.
    """
    kind = cfg.sampler
    seed = cfg.seed + offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if kind == "auto":
            kind = "nsga2" if space.multi else "tpe"
        if kind == "tpe":
            base: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
                n_startup_trials=cfg.startup_trials, multivariate=True, group=True,
                constant_liar=True, seed=seed)
        elif kind == "nsga2":
            base = optuna.samplers.NSGAIISampler(population_size=cfg.population, seed=seed)
        elif kind == "random":
            base = optuna.samplers.RandomSampler(seed=seed)
        else:
            raise SearchError(f"unknown sampler '{cfg.sampler}' (auto, tpe, nsga2, random)")
    return BaselineBlindSampler(base)


# ----------------------------------------------------------------------------- start design


class _Probe:
    """Stands in for an Optuna trial while the start design walks the space without a study:
    `suggest_*` returns the value assigned to a parameter when it is one the parameter can
    take, else the first option, and records every parameter met with the values it could
    have taken (so the walk sees the conditional parameters of *this* assignment only)."""

    MAX_VALUES = 16  # a wide numeric range is probed at this many evenly spaced points

    def __init__(self, assignment: dict[str, Any]):
        self.assignment = assignment
        self.params: dict[str, Any] = {}
        self.domains: dict[str, list[Any]] = {}
        self.train_vars: dict[str, Any] = {}

    def _pick(self, name: str, domain: list[Any]) -> Any:
        v = self.assignment.get(name, domain[0])
        if v not in domain:
            v = domain[0]
        self.params[name], self.domains[name] = v, domain
        return v

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._pick(name, list(choices))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        vals = list(range(low, high + 1, step)) if not log else sorted(
            {int(round(low * (high / low) ** (i / 7))) for i in range(8)} if low > 0 else {low, high})
        if len(vals) > self.MAX_VALUES:
            k = self.MAX_VALUES - 1
            vals = sorted({vals[round(i * (len(vals) - 1) / k)] for i in range(k + 1)})
        return self._pick(name, vals)

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None,
                      log: bool = False) -> float:
        if log and low > 0:
            vals = [low * (high / low) ** (i / 4) for i in range(5)]
        else:
            vals = [low + (high - low) * i / 4 for i in range(5)]
        if step:
            vals = sorted({min(high, low + round((v - low) / step) * step) for v in vals})
        return self._pick(name, vals)


def _probe(space: Space, assignment: dict[str, Any]) -> tuple[_Probe, Plan] | None:
    """Resolve the space at `assignment` (training variables bound too; `pr.train_vars`)."""
    pr = _Probe(assignment)
    try:
        plan = space.resolve(chooser=lambda c: suggest(pr, c))  # type: ignore[arg-type]
        pr.train_vars = bind_train_variables(space, plan, lambda c: suggest(pr, c))  # type: ignore[arg-type]
    except (BlockError, ValueError):
        return None
    return pr, plan


def _tokens(plan: Plan) -> list[str]:
    import re

    return re.findall(r"[^\s,()=]+", canonical_text(plan))


def _distance(a: list[str], b: list[str]) -> int:
    """Tokens of canonical text that differ (an edit count: 0 = the same architecture).
    Tokens, not lines: a slot of the right kind with one wrong width is nearer than a
    slot of the wrong kind, which is what lets the descent get there one step at a time."""
    import difflib

    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in sm.get_opcodes() if op != "equal")


def baseline_point(space: Space, passes: int = 3) -> tuple[dict[str, Any], int] | None:
    """The point of the space nearest the baseline, and its distance (0: the baseline itself).

    Coordinate descent on the canonical text: starting from every choice's first option,
    each parameter in turn takes the value that brings the resolved block closest to the
    baseline's text; a few passes settle the conditional parameters a change brings in.
    Only resolving is involved (milliseconds a point), no torch.
    """
    if space.baseline is None:
        return None
    try:
        target = _tokens(space.resolve_baseline())
    except BlockError:
        return None
    got = _probe(space, {})
    if got is None:
        return None
    cur = dict(got[0].params)
    best = _distance(_tokens(got[1]), target)
    for _ in range(passes):
        improved = False
        pr, _plan = _probe(space, cur) or (None, None)
        if pr is None:
            break
        for name in list(pr.domains):
            for v in pr.domains[name]:
                if v == cur.get(name):
                    continue
                got = _probe(space, {**cur, name: v})
                if got is None:
                    continue
                point = dict(got[0].params)
                d = _distance(_tokens(got[1]), target)
                # A change that brings in parameters (a slot turned into an FFN brings its
                # width) is judged with those set as well as they can be: one at a time.
                for new in [k for k in got[0].domains if k not in cur]:
                    for w in got[0].domains[new]:
                        g2 = _probe(space, {**point, new: w})
                        if g2 is not None:
                            d2 = _distance(_tokens(g2[1]), target)
                            if d2 < d:
                                d, point = d2, dict(g2[0].params)
                if d < best:
                    best, cur, improved = d, point, True
            if best == 0:
                return cur, 0
        if not improved:
            break
    return cur, best


def neighbourhood(space: Space, limit: int, seed: int = 0) -> list[dict[str, Any]]:
    """Up to `limit` one-change neighbours of the baseline's point, in a seeded order, most
    promising first: distinct architectures, none the baseline's, and ones whose static
    metrics (params, FLOPs: known without torch) already break a constraint left out.

    Why: in a space where most random points break the constraint (the default space: 197
    of 200 random blocks were slower than the baseline), a short search that starts at
    random trains almost nothing; the baseline's neighbours are mostly feasible, and their
    results tell the sampler which single changes help.
    """
    import random

    from blockdsl.graph import report

    start = baseline_point(space)
    if start is None or limit <= 0:
        return []
    point, _ = start
    pr, _plan = _probe(space, point) or (None, None)
    if pr is None:
        return []
    base_plan = space.resolve_baseline()
    base_hash = arch_hash(base_plan)
    base_static = _static_metrics(report(base_plan))
    static_cons = [(m, op, b) for m, op, b, _ in space.constraints if m in STATIC_METRICS]
    cands: list[tuple[dict[str, Any], str]] = []
    seen = {base_hash}
    for name, domain in pr.domains.items():
        for v in domain:
            if v == point.get(name):
                continue
            got = _probe(space, {**point, name: v})
            if got is None:
                continue
            probe, plan = got
            h = arch_hash(plan, probe.train_vars)
            if h in seen:
                continue
            seen.add(h)
            if static_cons:
                m = _static_metrics(report(plan))
                if any(_violation(m[k], op, float(eval_expr(b, {"baseline": base_static[k]}))) > 0
                       for k, op, b in static_cons):
                    continue
            cands.append((dict(probe.params), name))
    rng = random.Random(seed)
    rng.shuffle(cands)
    # Round-robin over the parameters changed, so a short list covers many of them.
    by_param: dict[str, list[dict[str, Any]]] = {}
    for params, name in cands:
        by_param.setdefault(name, []).append(params)
    out: list[dict[str, Any]] = []
    while len(out) < limit and any(by_param.values()):
        for name in list(by_param):
            if by_param[name] and len(out) < limit:
                out.append(by_param[name].pop())
    return out


# ----------------------------------------------------------------------------- results


@dataclass
class TrialRow:
    number: int
    state: str
    status: str
    role: str | None
    arch: str
    values: list[float] | None
    val_loss: float | None
    step_time: float | None
    ratio: float | None
    active_params: float | None
    note: str
    feasible: bool

    @classmethod
    def of(cls, t: FrozenTrial, retried: dict[int, int] | None = None) -> TrialRow:
        ua = t.user_attrs
        status = ua.get("status") or t.state.name.lower()
        note = ""
        if status == "copy":
            note = f"= #{ua.get('copy_of')} ({ua.get('copied_status')})"
        elif status == "infeasible":
            note = ua.get("infeasible", "")
        elif status in ("failed", "lost", "surplus", "interrupted"):
            note = ua.get("fail_reason", "")
        elif status == "pruned":
            rungs = ua.get("rungs") or {}
            note = f"pruned at rung {max(map(int, rungs))}" if rungs else "pruned"
        elif t.state == TrialState.FAIL and retried and t.number in retried:
            note = "worker lost"
        if retried and t.number in retried:
            note = (note + f"; retried as #{retried[t.number]}").lstrip("; ")
        feasible = all(v <= 0 for v in t.constraints.values())
        vl = ua.get("val_loss")
        if status == "pruned" or (status == "copy" and ua.get("copied_status") == "pruned"):
            rungs = ua.get("rungs") or {}
            vl = rungs[max(rungs, key=int)] if rungs else None
        return cls(t.number, t.state.name, status, ua.get("role"), ua.get("arch", ""),
                   list(t.values) if t.values else None,
                   None if status == "infeasible" else vl, ua.get("step_time"),
                   ua.get("step_time_ratio"), ua.get("active_params"), note, feasible)


def trial_rows(study: optuna.Study) -> list[TrialRow]:
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    return [TrialRow.of(t, retried) for t in trials]


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("role") == "baseline" and t.state == TrialState.COMPLETE:
            return t
    return None


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial (single objective) or the feasible Pareto set, baseline excluded.

    Excluded too are repeats of the baseline's architecture (a sampled point that
    deduplicates to it, `status=copy`): reporting one as the best block would present the
    baseline as a finding.
    """
    base = baseline_trial(study)
    base_hash = base.user_attrs.get("arch_hash") if base is not None else None
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("role") != "baseline"
                and (base_hash is None or t.user_attrs.get("arch_hash") != base_hash)
                and all(v <= 0 for v in t.constraints.values())
                and t.user_attrs.get("status") != "infeasible"
                and t.user_attrs.get("copied_status") != "infeasible"]
    if not complete:
        return []
    signs = [1.0 if d.name == "MINIMIZE" else -1.0 for d in study.directions]
    pts = [[s * v for s, v in zip(signs, t.values)] for t in complete]
    front = [t for t, p in zip(complete, pts) if not any(dominates(q, p) for q in pts)]
    # one per architecture (copies share values)
    seen, out = set(), []
    for t in sorted(front, key=lambda t: [s * v for s, v in zip(signs, t.values)]):
        h = t.user_attrs.get("arch_hash")
        if h not in seen:
            seen.add(h)
            out.append(t)
    return out if len(study.directions) > 1 else out[:1]


def summarize(study: optuna.Study) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    statuses: dict[str, int] = {}
    for t in trials:
        s = t.user_attrs.get("status") or t.state.name.lower()
        statuses[s] = statuses.get(s, 0) + 1
    base = baseline_trial(study)
    objectives = study.user_attrs.get("objectives") or [["val_loss", "minimize"]]

    def pick(t: FrozenTrial | None) -> dict[str, Any] | None:
        if t is None:
            return None
        ua = t.user_attrs
        return {"number": t.number, "arch": ua.get("arch"), "values": list(t.values or []),
                "val_loss": ua.get("val_loss"), "step_time": ua.get("step_time"),
                "step_time_ratio": ua.get("step_time_ratio"), "params": ua.get("params"),
                "active_params": ua.get("active_params"), "flops": ua.get("flops"),
                "steps": ua.get("steps")}

    found = best_trials(study)
    best = [t for t in found if beats(t, base, study.directions)]
    closest = [t for t in found if t not in best][:1] if not best else []
    searched = [t for t in counted_trials(trials) if t.user_attrs.get("role") != "baseline"]
    feasible_trained = sum(1 for t in searched if _own_status(t) in ("trained", "pruned")
                           and all(v <= 0 for v in t.constraints.values()))
    infeasible = sum(1 for t in searched if _own_status(t) == "infeasible"
                     or t.user_attrs.get("copied_status") == "infeasible"
                     or (_own_status(t) in ("trained", "pruned")
                         and any(v > 0 for v in t.constraints.values())))
    started = [t.datetime_start for t in trials if t.datetime_start]
    ended = [t.datetime_complete for t in trials if t.datetime_complete]
    wall = (max(ended) - min(started)).total_seconds() if started and ended else None
    return {
        "study": study.study_name, "space": study.user_attrs.get("space"),
        "objectives": objectives, "constraints": study.user_attrs.get("constraints", []),
        "trials": len(trials), "counted": len(counted_trials(trials)), "by_status": statuses,
        "trained": sum(1 for t in trials if t.user_attrs.get("status") in ("trained", "pruned")),
        "baseline": pick(base), "best": [pick(t) for t in best],
        "beats_baseline": bool(best) if base is not None else None,
        "closest": pick(closest[0]) if closest else None, "wall_seconds": wall,
        "searched": len(searched), "feasible_trained": feasible_trained,
        "infeasible": infeasible,
        "repeats": sum(1 for t in searched if _own_status(t) == "copy"),
        "verdict": _verdict(study, base, best, closest, len(searched), feasible_trained,
                            infeasible),
    }


def _own_status(t: FrozenTrial) -> str:
    return t.user_attrs.get("status") or t.state.name.lower()


def _verdict(study: optuna.Study, base: FrozenTrial | None, best: list[FrozenTrial],
             closest: list[FrozenTrial], searched: int, feasible: int, infeasible: int) -> str:
    """One sentence: what the search found, and why no block was written when none was."""
    cons = "; ".join(study.user_attrs.get("constraints") or [])
    within = f" within {cons}" if cons else ""
    base_v = f"{base.values[0]:.4f}" if base is not None and base.values else None
    trained = f"{feasible} of {searched} searched trials trained a new block{within}"
    if best:
        b = best[0]
        if len(best) > 1:
            return f"{trained}; {len(best)} blocks on the Pareto front beat the baseline"
        vs = f" vs the baseline's {base_v}" if base_v else ""
        return f"{trained}; best block: trial {b.number} ({b.values[0]:.4f}{vs})"
    if base is None:
        return f"no block found: {trained}"
    if searched == 0:
        return ("no best.block: the budget ran the baseline only, nothing was searched "
                "(raise --budget)")
    if feasible == 0:
        why = (f"{infeasible} broke {cons or 'a constraint'}" if infeasible
               else "none finished training")
        return (f"no best.block: none of the {searched} searched trials trained a block ({why});"
                " a larger --budget lets the sampler learn where the feasible blocks are")
    c = closest[0] if closest else None
    near = (f"; the closest, trial {c.number}: {c.values[0]:.4f} vs the baseline's {base_v}"
            if c is not None and c.values and base_v else "")
    return (f"no searched block beat the baseline (trial {base.number}), so no best.block: "
            f"{trained}{near}")


def beats(t: FrozenTrial, base: FrozenTrial | None, directions: Sequence[Any]) -> bool:
    """Whether `t` improves on the baseline: a better value (one objective), or a point the
    baseline does not weakly dominate (several). Without a baseline every trial counts."""
    if base is None or not base.values:
        return True
    signs = [1.0 if d.name == "MINIMIZE" else -1.0 for d in directions]
    p = [s * v for s, v in zip(signs, t.values)]
    q = [s * v for s, v in zip(signs, base.values)]
    if len(p) == 1:
        return p[0] < q[0]
    return not all(b <= a for a, b in zip(p, q))


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
            vals = ", ".join(f"{m}={_fmt(v)}" for (m, _), v in zip(summary["objectives"], t.values))
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
    from blockdsl.search import journal

    if journal.fcntl is None:  # pragma: no cover - Windows
        yield
        return
    lock = journal.FlockLock(str(folder / ".write.lock"))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def others_running(study: optuna.Study, grace: float) -> list[int]:
    """Trials other workers are still running (after reaping those of dead workers): while
    there are some, this worker is not the last one and leaves the results to it."""
    reap_stale(study, grace)
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]


def plot_study(study: optuna.Study, path: Path, shows: dict[str, int] | None = None) -> Path | None:
    """Optimisation history (single objective) or Pareto front (first two objectives).

    `shows` receives how many points of each kind were drawn. The history always spans
    the study's trials and marks the infeasible ones along its foot, so a short search that
    trained nothing but the baseline still shows what it tried (not an empty 0..1 frame).
    """
    shows = shows if shows is not None else {}
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = trial_rows(study)
    objectives = study.user_attrs.get("objectives") or [["val_loss", "minimize"]]
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    base = next((r for r in rows if r.role == "baseline" and r.values), None)
    if len(study.directions) == 1:
        pts = [(r.number, r.values[0]) for r in rows if r.values and r.status == "trained"
               and r.role != "baseline" and r.feasible]
        pruned = [(r.number, r.val_loss) for r in rows if r.status == "pruned" and r.val_loss]
        copies = [(r.number, r.values[0]) for r in rows if r.status == "copy" and r.values
                  and r.feasible]
        if pts:
            ax.plot(*zip(*pts), "o", ms=4, label="trained")
        if copies:
            ax.plot(*zip(*copies), ".", ms=3, color="grey", label="repeat (reused)")
        if pruned:
            ax.plot(*zip(*pruned), "x", ms=4, color="tab:red", alpha=0.6,
                    label="pruned (value at rung)")
        allpts = sorted(pts + copies)
        if allpts:
            best, xs, ys = math.inf, [], []
            sign = 1 if study.directions[0].name == "MINIMIZE" else -1
            for n, v in allpts:
                best = min(best, sign * v)
                xs.append(n)
                ys.append(sign * best)
            ax.step(xs, ys, where="post", color="black", lw=1.2, label="best so far")
        if base is not None:
            ax.axhline(base.values[0], color="tab:green", ls="--", lw=1.2, label="baseline")
            ax.plot([base.number], [base.values[0]], "*", ms=11, color="tab:green")
        bad = [r.number for r in rows if r.role != "baseline" and (
            r.status == "infeasible" or (r.status in ("copy", "trained") and not r.feasible))]
        if bad:
            # Their value is the untrained model's (ln V): a mark at the foot, not a point.
            ax.plot(bad, [0.02] * len(bad), "|", ms=9, color="tab:purple",
                    transform=ax.get_xaxis_transform(), label="infeasible (not trained)")
        if rows:
            ax.set_xlim(-0.5, max(r.number for r in rows) + 0.5)
        ax.set_xlabel("trial")
        ax.set_ylabel(objectives[0][0])
        failed = sum(1 for r in rows if r.state == "FAIL")
        ax.set_title(f"{study.study_name}: optimisation history\n"
                     f"({len(pts)} trained, {len(bad)} infeasible, {failed} failed)", fontsize=10)
        shows.update(trained=len(pts), pruned=len(pruned), repeats=len(copies),
                     infeasible=len(bad), baseline=int(base is not None))
    else:
        xm, ym = objectives[1][0], objectives[0][0]
        pts = [(r.values[1], r.values[0]) for r in rows
               if r.values and r.status in ("trained", "copy") and r.feasible and r.role != "baseline"]
        front = best_trials(study)
        if pts:
            ax.plot(*zip(*pts), "o", ms=4, alpha=0.5, label="trials")
        if front:
            f = sorted((t.values[1], t.values[0]) for t in front)
            ax.plot(*zip(*f), "o-", color="tab:red", ms=5, label="Pareto front")
        if base is not None:
            ax.plot([base.values[1]], [base.values[0]], "*", ms=12, color="tab:green",
                    label="baseline")
        ax.set_xlabel(xm)
        ax.set_ylabel(ym)
        ax.set_title(f"{study.study_name}: Pareto front")
        shows.update(trials=len(pts), front=len(front), baseline=int(base is not None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


# ----------------------------------------------------------------------------- entry point


def describe_budget(cfg: SearchConfig) -> str:
    """A trial's training budget in the units it is counted in (the header of a run)."""
    if cfg.clock == "wall":
        return f"{cfg.seconds:g} s of wall-clock training each"
    if cfg.baseline_steps:
        return f"{cfg.baseline_steps} baseline steps of training each"
    if cfg.pace:
        return (f"{round(cfg.seconds / cfg.pace)} baseline steps of training each "
                f"({cfg.seconds:g} s at the space's pace of {cfg.pace:g} s/step, measured on "
                "its reference machine: not seconds here)")
    return f"{cfg.seconds:g} s of baseline training each, at the pace the baseline trial measures"


def default_space_path() -> Path:
    """`search/brainformer.block` in the working directory, else the repository's (an
    editable install), else the copy a wheel ships as `blockdsl/spaces/`."""
    name = Path(DEFAULT_SPACE).name
    pkg = Path(__file__).resolve().parent.parent  # blockdsl/
    for cand in (Path(DEFAULT_SPACE), pkg.parent / DEFAULT_SPACE, pkg / "spaces" / name):
        if cand.exists():
            return cand
    return Path(DEFAULT_SPACE)  # absent everywhere: the error names the usual place


def new_study_name(space: Space) -> str:
    return f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*set_constraint.*")


def search(space: str | Path | Space | None = None, *, study: str | None = None,
           storage: str | None = None, workers: int = 1, root: Path | None = None,
           on_event: Event | None = None, **settings: Any) -> optuna.Study:
    """Run (or resume) a search in this process; `workers > 1` is the CLI's job (processes).

    Returns the study; `summarize(study)` / `write_results(study, dir)` give the results.
    """
    quiet_optuna()
    sp = space if isinstance(space, Space) else load_space(space or default_space_path())
    cfg = make_config(sp, **settings)
    name = study or new_study_name(sp)
    st = open_storage(storage, name, cfg, root)
    s = create_study(sp, cfg, st, name)
    Worker(sp, s, cfg, on_event).run()
    return s
