"""One worker: runs trials of a study until its budget is used (`run(workers=N)` starts N).

A trial goes resolve -> deduplicate -> static metrics -> build -> paired timing -> train,
and stops at the first stage that decides it:

- Constraints cost no training when the IR can decide them (params, FLOPs from
  `graph.report`), and only a short timing when it cannot.
- Infeasible trials are COMPLETE with constraint values set (`Trial.set_constraint`), so TPE
  and NSGA-II learn where the feasible region is; their val_loss is the untrained model's
  (uniform prediction, ln V).
- Each trial trains for a fixed time budget (Brainformer: faster models take more steps) and
  reports validation loss at rungs. By default the budget is converted to steps with the
  paired step-time ratio and the baseline's pace (`clock="paired"`), so a busy machine
  slows the search down but does not change its results; `clock="wall"` is the literal
  wall-clock rule.

Torch, the lowering and the trainer are imported inside the methods that use them, so
importing the search (for `search show`, or a study's results) does not load torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from blockdsl.lang.errors import BlockError
from blockdsl.plan import Plan
from blockdsl.search import constraints as C
from blockdsl.search import optuna_glue as glue
from blockdsl.search.arch import arch_hash, arch_summary, suggest
from blockdsl.search.dedup import claim_architecture
from blockdsl.search.errors import SearchError, TrialFailed
from blockdsl.search.liveness import heartbeat, mark_worker, reap_stale, worker_identity
from blockdsl.search.pruning import ParetoRungPruner, RungPruner
from blockdsl.search.results import budget_done, counted_trials
from blockdsl.search.samplers import make_sampler
from blockdsl.search.space import TRAINED_METRICS, SearchConfig, Space, bind_train_variables
from blockdsl.search.storage import retry_stale_trial
from blockdsl.search.timing import StepTimes, paired_step_times

if TYPE_CHECKING:
    from torch import nn

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
        mark_worker(self.study, trial, self.identity)
        with heartbeat(self.study, trial, self.cfg.heartbeat):
            try:
                return self._objective(trial)
            except KeyboardInterrupt:
                # Stopped by the user mid-trial: run it again on resume.
                self.stop_requested = True
                trial.set_user_attr("status", "interrupted")
                trial.set_user_attr("fail_reason", "interrupted (Ctrl-C); re-enqueued")
                retry_stale_trial(self.study, glue.fresh(self.study, trial))
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
        plan, h = self._bind(trial, is_base)

        # 2. never train an architecture twice
        src = claim_architecture(self.study, trial, h,
                                 on_wait=lambda: reap_stale(self.study, cfg.grace))
        if src is not None:
            return self._copy(trial, src)

        # 3. what the IR tells without torch
        from blockdsl.graph import report

        metrics = C.static_metrics(report(plan))
        for k, v in metrics.items():
            trial.set_user_attr(k, v)
        ref_model, ref_rep = self._reference()
        base = C.static_metrics(ref_rep) if ref_rep is not None else {}
        violations = C.violations(space, metrics, base)
        if violations and not is_base:
            return self._infeasible(trial, plan, metrics, base, violations)

        # 4. build; time against the baseline (paired), which also sets the rung schedule
        try:
            model = self._build(plan)
        except Exception as e:  # noqa: BLE001 - a lowering error is the candidate's fault
            raise self._fail(trial, f"lowering: {type(e).__name__}: {e}") from None
        t_cand = 0.0
        if space.needs_timing:
            t_cand = self._time(trial, model, ref_model, is_base, metrics, base)
            violations = C.violations(space, metrics, base)
            if violations and not is_base:
                return self._infeasible(trial, plan, metrics, base, violations)

        # 5. train for the fixed budget, reporting rungs
        if space.trained_metric is not None:
            metrics.update(self._train(trial, model, t_cand or 0.05, metrics, base))
        violations = C.violations(space, metrics, base)
        C.set_constraints(space, trial, metrics, base)
        trial.set_user_attr("status", "trained")
        if violations:
            trial.set_user_attr("infeasible", "; ".join(violations))
        self.on_event("done", {"number": trial.number, "metrics": metrics})
        return self._values(metrics)

    def _bind(self, trial: optuna.Trial, is_base: bool) -> tuple[Plan, str]:
        """Resolve the trial's point (or the baseline) and record what it is; returns the
        Plan and its architecture hash. Sets `self._vars`, the bound training variables."""
        space = self.space
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
        return plan, h

    def _time(self, trial: optuna.Trial, model: nn.Module, ref_model: nn.Module | None,
              is_base: bool, metrics: dict[str, float], base: dict[str, float]) -> float:
        """Paired timing against the baseline; sets `step_time` in `metrics` and `base` and
        returns the candidate's measured seconds per step."""
        cfg = self.cfg
        self.on_event("timing", {"number": trial.number})
        try:
            batch = self._dataset(model).train_batch(0, cfg.batch_size, cfg.seed)
            times = paired_step_times(
                model, None if is_base else ref_model, batch, cfg.precision,
                cfg.timing_steps * (2 if is_base else 1), stop_ratio=C.stop_ratio(self.space))
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
        return t_cand

    def _values(self, metrics: dict[str, float]) -> float | list[float]:
        vals = [float(metrics[m]) for m, _ in self.space.objectives]
        return vals[0] if len(vals) == 1 else vals

    def _infeasible(self, trial: optuna.Trial, plan: Plan, metrics: dict[str, float],
                    base: dict[str, float], violations: list[str]) -> float | list[float]:
        """COMPLETE with constraint values set, so the sampler learns; no training spent."""
        C.set_constraints(self.space, trial, metrics, base)
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

    def _schedule(self, trial: optuna.Trial,
                  step_time: float) -> tuple[int | None, float | None, int, bool]:
        """The trial's training budget: (steps, seconds, steps per rung, counted in steps)."""
        cfg = self.cfg
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
            return steps, seconds, max(1, round(steps / cfg.rungs)), True
        if cfg.clock == "wall":
            spr = max(1, round(cfg.seconds / cfg.rungs / max(step_time, 1e-4)))
            return cfg.steps, cfg.seconds, spr, cfg.seconds is None
        raise SearchError(f"clock must be wall or paired, got {cfg.clock!r}")

    def _train_config(self, trial: optuna.Trial, steps: int | None, seconds: float | None,
                      spr: int) -> Any:
        """The trainer's settings for this trial (the space's training variables win)."""
        from blockdsl.train import TrainConfig

        cfg = self.cfg
        return TrainConfig(
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

    def _rung_watch(self, trial: optuna.Trial, sign: float, pre: list[float],
                    rungs: dict[str, float], steps: int | None, seconds: float | None,
                    by_steps: bool) -> Callable[[int, dict[str, float]], bool]:
        """The trainer's `on_eval`: records the trained metric at each rung (into `rungs`)
        and raises `optuna.TrialPruned` when the pruner stops the trial there."""
        cfg, space = self.cfg, self.space
        metric = space.trained_metric or "val_loss"
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

        return on_eval

    def _train(self, trial: optuna.Trial, model: nn.Module, step_time: float,
               metrics: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        from blockdsl.train import TrainError, train

        cfg, space = self.cfg, self.space
        metric = space.trained_metric or "val_loss"
        signs = {m: (-1.0 if d == "maximize" else 1.0) for m, d in space.objectives}
        sign = signs.get(metric, -1.0 if metric == "val_acc" else 1.0)
        steps, seconds, spr, by_steps = self._schedule(trial, step_time)
        tcfg = self._train_config(trial, steps, seconds, spr)
        rungs: dict[str, float] = {}
        pre = [signs[m] * metrics.get(m, 0.0) for m, _ in space.objectives if m not in TRAINED_METRICS]
        trial.set_user_attr("pre_values", pre)
        on_eval = self._rung_watch(trial, sign, pre, rungs, steps, seconds, by_steps)

        self.on_event("train", {"number": trial.number, "seconds": cfg.seconds})
        t0 = time.perf_counter()
        try:
            res = train(model, tcfg, dataset=self._dataset(model), on_eval=on_eval)
        except optuna.TrialPruned:
            trial.set_user_attr("status", "pruned")
            trial.set_user_attr("train_wall", time.perf_counter() - t0)
            C.set_constraints(space, trial, metrics, base)
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
            retry_stale_trial(self.study, glue.fresh(self.study, trial))
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
            orig = glue.trial_by_number(self.study, int(src.user_attrs["copy_of"]))
        status = orig.user_attrs.get("status")
        trial.set_user_attr("copy_of", orig.number)
        trial.set_user_attr("copied_status", status)
        for k in ("params", "active_params", "flops", "step_time", "step_time_ratio", "rungs",
                  "pre_values", "infeasible", "fail_reason", "steps", *TRAINED_METRICS):
            if k in orig.user_attrs:
                trial.set_user_attr(k, orig.user_attrs[k])
        C.write_constraints(trial, [(k, v) for k, v in orig.constraints.items()
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


def _error_reason(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
        return f"out of memory: {text}"
    return text
