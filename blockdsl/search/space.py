"""A search space as the driver sees it, and the settings a search runs with.

`load_space` reads a `.block` file's space: the choices stay in the IR (the resolver asks
for them, define-by-run), the directives (objectives, constraints, baseline, budget) are
read here once. `SearchConfig` holds every other setting; its defaults are overridden by
the space's budget line, then by explicit settings (`make_config`), each value checked
before anything runs. Nothing here imports Optuna or torch: a space can be loaded and
checked by tools that never search.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError, brief
from blockdsl.lang.expr import Scope, eval_expr, first_option
from blockdsl.lang.parse import load_module
from blockdsl.lang.resolve import merged, resolve
from blockdsl.names import PRECISIONS, SAMPLERS, STARTS
from blockdsl.plan import ChoiceDef, Plan
from blockdsl.search.errors import SearchError

# Metrics a space may minimize/maximize or constrain. Static ones are known from the Plan.
STATIC_METRICS, TIMED_METRICS = ir.STATIC_METRICS, ir.TIMED_METRICS
TRAINED_METRICS, METRICS = ir.TRAINED_METRICS, ir.METRICS
# Space variables with these names are training hyper-parameters (they may be choices).
TRAIN_VARIABLES = ("lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip")

DEFAULT_SPACE = "search/brainformer.block"
STUDY_DIR = Path("studies")


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
    precision: str = "bf16"  # the CLI's one default for every command (cli/common.py says why)
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
_CHOICES = {"clock": ("wall", "paired"), "sampler": SAMPLERS, "precision": PRECISIONS,
            "start": STARTS}


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
