"""The training loop: `train(model, config)`, one library function the CLI and the search call.

Design choices, each for a reason:
- The batch of optimizer step s is a pure function of (seed, s) and is the *global* batch;
  ranks and accumulation micro-steps slice it. So a resumed run, a 2-process run and a
  run with gradient accumulation all see the same examples as the straight single run,
  and `batch_size` means the same thing whatever the memory knobs.
- Gradients are averaged across ranks with one flat all-reduce per step instead of
  wrapping in DistributedDataParallel (see `dist.Dist`). `shard`/`ep` runs go through the
  same step with `parallel.Parallel`'s gradient reduction and clipping hooks; the model is
  broadcast from rank 0 before it is cut up, and evaluation then splits every batch's rows
  over the ranks (every rank must run every forward: they hold collectives).
- The learning-rate schedule is a function of progress in [0, 1], the larger of
  step/total-steps and train-seconds/budget-seconds, so a wall-clock budget (fixed-time
  trials, where faster models take more steps) still ends its cosine at the budget.
  Budget seconds count training steps only, not evaluation or checkpoint writing.
- The step itself is `step.step`, the one every other caller runs too; this module adds
  what only a run has: the schedule, the rank's slice, the NaN stop, logging, evaluation,
  checkpoints and the result.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from blockdsl.taskio import io_of
from blockdsl.train import checkpoint as checkpoints
from blockdsl.train.compiled import compile_default, compile_for_training
from blockdsl.train.config import EvalCallback, TrainConfig, TrainError, TrainResult, validate
from blockdsl.train.data import BYTE_VOCAB, DataError, TaskData, load_for_model
from blockdsl.train.device import matmul_rate, precision_context, seed_everything
from blockdsl.train.dist import Dist
from blockdsl.train.env import run_environment, summary_row
from blockdsl.train.evaluate import evaluate
from blockdsl.train.optim import lr_at, make_adamw, param_groups
from blockdsl.train.parallel import Parallel
from blockdsl.train.progress import Interrupt, Progress
from blockdsl.train.runfiles import RunFiles, check_out, plot_losses
from blockdsl.train.step import step
from blockdsl.train.tblog import TensorBoardMissing, require


def train(model: nn.Module, config: TrainConfig | None = None, *,
          dataset: TaskData | None = None, on_eval: EvalCallback | None = None) -> TrainResult:
    """Train `model` (a blockdsl module: `model(x).logits`, `.aux`, `.io`) in place.

    `dataset` lets a caller (the search) load data once for many runs; by default it is
    loaded from `config.data` and checked against the model. Launched by torchrun, every
    rank calls this and takes its shard of each global batch; only rank 0 writes files.
    Raises TrainError for anything the user can fix; an exception from `on_eval` is
    re-raised once every rank has stopped.
    """
    cfg = config or TrainConfig()
    validate(cfg)
    if cfg.steps is None and cfg.tokens is None and cfg.seconds is None:
        cfg = TrainConfig(**{**asdict(cfg), "steps": 200})
    dist = Dist.setup(cfg.device)
    try:
        with precision_context(cfg.precision, dist.device), Interrupt() as interrupt:
            run = _Run(model, cfg, dist, dataset, on_eval, interrupt)
            try:
                return run.loop()
            finally:
                run.close()
    finally:
        dist.close()


class _Run:
    """One call of `train`: set-up, the step, evaluation, checkpoints, and the result."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, dist: Dist,
                 dataset: TaskData | None, on_eval: EvalCallback | None,
                 interrupt: Interrupt) -> None:
        self.wall0 = time.perf_counter()
        self.model, self.cfg, self.dist, self.on_eval = model, cfg, dist, on_eval
        self.interrupt = interrupt
        self.device = dist.device
        self.step, self.tokens, self.train_time = 0, 0, 0.0
        self.files = RunFiles(None, None)
        self.bar = Progress(False, None, "")
        self._agree(self._setup, dataset)
        dist.broadcast_module(model)  # before sharding: every rank cuts the same weights
        self._agree(self._setup_state)
        # the step may run a compiled view (same parameters, after any sharding); evaluation
        # and checkpoints use the model itself
        use = cfg.compile if cfg.compile is not None else compile_default(self.device)
        self.step_model = compile_for_training(model) if use else model
        self.start_time = self.train_time
        # Resuming a run whose checkpoint already spent the budget: nothing to train, and
        # nothing to write (a second final evaluation would duplicate the last eval row).
        self.finished = self.resumed and not self.budget_left()
        tb = Path(cfg.tensorboard).expanduser() if cfg.tensorboard and dist.main else None
        self.files = RunFiles(self.out if dist.main and not self.finished else None,
                               self.step if self.resumed else None,
                               tb if not self.finished else None)
        self.peak = None
        if cfg.flops_per_token and dist.main:
            self.peak = matmul_rate(self.device, cfg.precision) * dist.world
        self.verbose = dist.main and not cfg.quiet
        show = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        total = float(self.total_steps) if self.total_steps is not None else cfg.seconds
        self.bar = Progress(bool(show) and self.verbose and not self.finished, total,
                             "tok" if self.ds.task == "lm" else "img", self.step_text())
        self.val_batches = self.ds.val_batches(cfg.batch_size, cfg.eval_batches)
        self.losses: list[Tensor] = []
        self.aux_steps: dict[str, list[Tensor]] = {}
        self.evals: list[tuple[int, dict[str, float]]] = []
        self.window_time = 0.0
        self.stopped_by = "budget"
        self.pending_error: BaseException | None = None
        self.last_ckpt: Path | None = None
        self.last_eval_step = -1

    def _agree(self, fn: Any, *args: Any) -> None:
        """Run a set-up phase; if it failed on any rank, raise on every rank."""
        error: TrainError | None = None
        try:
            fn(*args)
        except TrainError as e:
            error = e
        # every rank must learn that one failed, or the others wait in a collective forever
        failed = self.dist.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))[0] > 0
        if error is not None:
            raise error
        if failed:
            raise TrainError("another process failed to set up training; see rank 0's error")

    def _setup(self, dataset: TaskData | None) -> None:
        cfg, dist, model = self.cfg, self.dist, self.model
        if (cfg.precision == "bf16" and self.device.type == "cuda"
                and not torch.cuda.is_bf16_supported()):
            raise TrainError("this GPU has no bf16 support; use precision fp32 or fp32-medium")
        try:
            self.ds = dataset or load_for_model(model, cfg.data, cfg.seq_len)
        except DataError as e:
            raise TrainError(str(e)) from None
        task = io_of(model).task
        if task != self.ds.task:
            raise TrainError(f"model task {task!r} does not fit "
                             f"{self.ds.task!r} data {self.ds.name}")
        if cfg.batch_size % (dist.world * cfg.accum):
            raise TrainError(f"batch_size {cfg.batch_size} must divide evenly over "
                             f"{dist.world} process(es) x accum {cfg.accum}")
        self.per_step = cfg.batch_size * self.ds.units_per_sample
        self.total_steps = cfg.steps
        if cfg.tokens is not None:
            by_tokens = math.ceil(cfg.tokens / self.per_step)
            self.total_steps = by_tokens if cfg.steps is None else min(cfg.steps, by_tokens)
        byte_level = getattr(self.ds, "vocab_size", None) == BYTE_VOCAB
        self.bytes_per_token = getattr(self.ds, "bytes_per_token", 1.0 if byte_level else None)

        if cfg.tensorboard and dist.main:
            try:
                require()
            except TensorBoardMissing as e:
                raise TrainError(str(e)) from None
        self.out = Path(cfg.out).expanduser() if cfg.out is not None else None
        ckpt = checkpoints.latest_checkpoint(self.out) if self.out is not None else None
        found = checkpoints.checkpoint_folders(self.out) if self.out is not None else []
        if self.out is not None and dist.main:
            check_out(self.out)
            if (ckpt is not None or found) and not cfg.resume:
                raise TrainError(f"{self.out} already holds a checkpoint "
                                 f"({(ckpt or found[0]).name}); "
                                 "resume it or choose another output folder")
        model.to(self.device)
        seed_everything(cfg.seed)  # identical on every rank, so rank 0's RNG state fits all
        self.ckpt, self.found = ckpt, found

    def _setup_state(self) -> None:
        """Sharding (if asked), the optimizer, and the resumed state."""
        cfg, model, ckpt, found = self.cfg, self.model, self.ckpt, self.found
        self.par: Parallel | None = None
        if cfg.shard != "none" or cfg.ep > 1:
            self.par = Parallel.setup(model, self.dist, cfg.shard, cfg.ep)
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = param_groups(model, cfg.weight_decay)
        if self.par is not None:
            groups = self.par.optimizer_groups(groups)
        self.opt = make_adamw(groups, cfg.lr, cfg.betas, self.device)
        self.resumed = cfg.resume and (ckpt is not None or bool(found))
        if cfg.resume and not self.resumed and self.out is not None and self.dist.main:
            # not an error (a first run may ask to resume), but a mistyped --out must not
            # pass for a resume: say that this one starts afresh
            print(f"note: {self.out} holds no checkpoint to resume: starting a new run there",
                  file=sys.stderr, flush=True)
        self.resumed_from: Path | None = None
        self.recent: dict[str, list[Tensor]] = {}
        if self.resumed:
            if ckpt is not None:
                state = checkpoints.load_checkpoint(ckpt, model, self.opt, self.par)
            else:
                ckpt, state = self._newest_loadable(found)
            for name in ("seed", "batch_size"):
                if state["config"][name] != getattr(cfg, name):
                    raise TrainError(
                        f"checkpoint {ckpt} was made with {name} {state['config'][name]}, "
                        f"not {getattr(cfg, name)}: the data order would change"
                    )
            self.resumed_from = ckpt
            self.step, self.tokens = state["step"], int(state["tokens"])
            self.train_time = state["train_time"]
            # the per-step losses of the log window the checkpoint fell in, so the first
            # logged window after a resume averages the same steps as an uninterrupted run
            self.recent = {k: list(v.unbind()) for k, v in state.get("recent", {}).items()}
            checkpoints.set_rng_state(state["rng"])

    def _newest_loadable(self, found: list[Path]) -> tuple[Path, dict[str, Any]]:
        """No `latest` (lost, or never written): the newest checkpoint that verifies and
        loads, said on stderr; if none does, refuse rather than start over on top of them."""
        skipped: list[str] = []
        for path in found:
            try:
                state = checkpoints.load_checkpoint(path, self.model, self.opt, self.par)
            except TrainError as e:
                skipped.append(f"{path.name}: {str(e).split(': ', 1)[-1]}")
                continue
            if self.dist.main and not self.cfg.quiet:
                extra = f" (skipped {'; '.join(skipped)})" if skipped else ""
                print(f"note: {self.out} has no '{checkpoints.LATEST}': resuming from {path.name}, the "
                      f"newest checkpoint that loads{extra}", file=sys.stderr, flush=True)
            return path, state
        raise TrainError(f"{self.out} has no '{checkpoints.LATEST}' and none of its checkpoints loads "
                         f"({'; '.join(skipped)[:400]}); nothing was changed")

    # -- pieces of the loop

    def say(self, text: str) -> None:
        if self.bar.bar is not None:
            self.bar.log(text)
        elif self.verbose:
            print(text, file=sys.stderr, flush=True)

    def progress(self) -> float:
        """Fraction of the budget used: steps after warm-up, or train seconds, whichever leads."""
        cfg, p = self.cfg, 0.0
        if self.total_steps is not None:
            p = (self.step - cfg.warmup) / max(1, self.total_steps - cfg.warmup)
        if cfg.seconds is not None:
            p = max(p, self.train_time / cfg.seconds)
        return p

    def step_text(self) -> str:
        """The bar's step: `9/300`, or with a seconds budget only, its share used so far."""
        if self.total_steps is not None:
            return f"{self.step}/{self.total_steps}"
        return f"{self.step} ({min(self.train_time / self.cfg.seconds, 1.0):.0%} of " \
               f"{self.cfg.seconds:g} s)"

    def budget_left(self) -> bool:
        if self.total_steps is not None and self.step >= self.total_steps:
            return False
        return self.cfg.seconds is None or self.train_time < self.cfg.seconds

    def train_step(self) -> None:
        cfg, dist = self.cfg, self.dist
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.progress(), cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = self.ds.train_batch(self.step, cfg.batch_size, cfg.seed)
        per_rank = cfg.batch_size // dist.world
        lo = dist.rank * per_rank
        # check_finite runs before the update: a NaN step leaves the weights as they are
        out = step(self.step_model, x[lo: lo + per_rank], y[lo: lo + per_rank],
                   precision=cfg.precision, device=self.device, accum=cfg.accum,
                   optimizer=self.opt, params=self.params,
                   reduce_grads=self.par.reduce_grads if self.par else dist.average_grads,
                   clip=cfg.grad_clip, before_update=self.check_finite,
                   clip_grads=self.par.clip_grad_norm if self.par else None)
        loss, aux, grad_norm = out.loss, out.aux, out.grad_norm
        self.step += 1
        self.tokens += self.per_step
        # one small all-reduce keeps loss, stop request and clock identical on all ranks
        keys = sorted(aux)
        shared = torch.stack(
            [loss.float().cpu()] + [aux[k].cpu() for k in keys]
            + [torch.tensor(float(self.interrupt.requested)),
               torch.tensor(time.perf_counter() - t0)]
        ).double()
        shared = dist.all_reduce_sum(shared) / dist.world
        dt = float(shared[-1])
        self.train_time += dt
        self.window_time += dt
        self.losses.append(shared[0].float())
        for i, k in enumerate(keys):
            self.aux_steps.setdefault(k, []).append(shared[1 + i].float())
        if shared[-2] > 0:
            self.stopped_by = "interrupt"
        timed = cfg.seconds is not None and self.total_steps is None
        rate = self.per_step / max(dt, 1e-9)
        self.bar.update(self.train_time if timed else self.step, step=self.step_text(),
                        loss=f"{float(shared[0]):.4f}", rate=f"{rate:,.0f}")
        if self.step % cfg.log_every == 0:
            self.log_train(lr, grad_norm)

    def check_finite(self, loss: Tensor, aux: dict[str, Tensor], grad_norm: Tensor | None) -> None:
        """Stop the run at the step whose loss, aux loss or gradient norm is NaN or infinite.

        Checked on every rank before the optimizer applies the step (one flag is summed over
        ranks, so all stop together), so no update made of NaN reaches the weights; the
        run then ends without writing a checkpoint, and the last one written stays `latest`.
        """
        vals = [loss.detach().float().reshape(())]
        vals += [v.detach().float().reshape(()) for v in aux.values()]
        if grad_norm is not None:
            vals.append(grad_norm.detach().float().reshape(()))
        bad = (~torch.isfinite(torch.stack(vals))).any().float().cpu().reshape(1)
        if float(self.dist.all_reduce_sum(bad)[0]) == 0:
            return
        step = self.step + 1  # the step being computed, numbered as its metrics row would be
        if not math.isfinite(float(loss)):
            what = f"non-finite training loss ({float(loss)})"
        elif any(not math.isfinite(float(v)) for v in aux.values()):
            what = "non-finite aux loss (" + ", ".join(
                f"{k} {float(v)}" for k, v in aux.items() if not math.isfinite(float(v))) + ")"
        elif grad_norm is not None and not math.isfinite(float(grad_norm)):
            what = f"non-finite gradient norm ({float(grad_norm)})"
        else:
            what = "a non-finite loss on another process"
        self.diverged(step, what)

    def diverged(self, step: int, what: str) -> None:
        """Log a strict-JSON error row and raise the one-line TrainError that ends the run."""
        self.files.log({"kind": "error", "step": step, "loss": None,
                        "error": f"{what} at step {step}"})
        if self.out is None:
            kept = "nothing was saved (no output folder)"
        else:
            last = self.last_ckpt or checkpoints.latest_checkpoint(self.out)
            kept = (f"the last checkpoint, {last}, is kept" if last is not None
                    else "no checkpoint had been written (see --ckpt-every)")
        raise TrainError(f"{what} at step {step}: training diverged and was stopped; {kept}; "
                         "try a lower learning rate")

    def window(self, key: str, vals: list[Tensor]) -> list[Tensor]:
        """The last `log_every` per-step values, reaching into the ones the resumed
        checkpoint carried when this call has run fewer steps than that."""
        n = self.cfg.log_every
        if len(vals) >= n:
            return vals[-n:]
        prior = self.recent.get(key, [])
        return prior[max(0, len(prior) - (n - len(vals))):] + vals

    def log_train(self, lr: float, grad_norm: Tensor | None) -> None:
        n = min(self.cfg.log_every, len(self.losses))  # steps timed in this call's window
        rec: dict[str, Any] = {
            "kind": "train", "step": self.step,
            "loss": float(torch.stack(self.window("loss", self.losses)).mean()), "lr": lr,
            "tokens": self.tokens, "tokens_per_s": n * self.per_step / max(self.window_time, 1e-9),
            "train_seconds": self.train_time,
        }
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)
        for k, vals in self.aux_steps.items():
            rec[f"aux/{k}"] = float(torch.stack(self.window(f"aux/{k}", vals)).mean())
        self.files.log(rec)
        self.window_time = 0.0

    def run_eval(self) -> bool:
        """Evaluate, log, call back; True when the callback asked (on rank 0) to stop."""
        metrics = evaluate(self.model, self.val_batches, self.cfg.precision, self.device,
                           self.dist, bytes_per_token=self.bytes_per_token,
                           split_rows=self.par is not None)
        if not math.isfinite(metrics["val_loss"]):  # identical on all ranks (all-reduced)
            self.diverged(self.step, f"non-finite validation loss ({metrics['val_loss']})")
        self.last_eval_step = self.step
        recent = self.window("loss", self.losses)
        if recent:
            metrics["train_loss"] = float(torch.stack(recent).mean())
        # an int like the train rows' (a float loses exactness past 2**53 and reads oddly)
        metrics.update(tokens=int(self.tokens), train_seconds=self.train_time)
        self.evals.append((self.step, metrics))
        self.files.log({"kind": "eval", "step": self.step, **metrics})
        extra = "".join(f"  {k} {metrics[k]:.4f}" for k in ("val_bpb", "val_acc") if k in metrics)
        self.say(f"step {self.step:>6}  val_loss {metrics['val_loss']:.4f}{extra}")
        stop = 0.0
        if self.on_eval is not None and self.dist.main:
            try:
                stop = 1.0 if self.on_eval(self.step, dict(metrics)) else 0.0
            except BaseException as e:  # noqa: BLE001 - re-raised after every rank stops
                self.pending_error, stop = e, 1.0
        return bool(self.dist.all_reduce_sum(torch.tensor([stop]))[0] > 0)

    def checkpoint(self) -> None:
        if self.out is None or not (self.dist.main or self.par is not None):
            return  # a sharded run's ranks each write their shards
        if self.last_ckpt is not None and self.last_ckpt.name == f"{checkpoints.CKPT_PREFIX}{self.step:08d}":
            return  # the end-of-run checkpoint of a step that --ckpt-every just wrote
        recent = {"loss": self.window("loss", self.losses)}
        recent.update({f"aux/{k}": self.window(f"aux/{k}", v) for k, v in self.aux_steps.items()})
        state = {
            "step": self.step, "tokens": self.tokens, "train_time": self.train_time,
            "recent": {k: torch.stack(v) for k, v in recent.items() if v},
            "config": {k: (str(v) if isinstance(v, Path) else v)
                       for k, v in asdict(self.cfg).items()},
        }
        try:
            if self.par is not None:
                self.last_ckpt = checkpoints.save_sharded_checkpoint(
                    self.out, self.step, self.model, self.opt, state, self.cfg.keep_checkpoints,
                    self.par)
            else:
                self.last_ckpt = checkpoints.save_checkpoint(self.out, self.step, self.model, self.opt, state,
                                                 self.cfg.keep_checkpoints)
        except OSError as e:
            raise TrainError(f"cannot write checkpoint in {self.out}: {e.strerror or e}") from None

    # -- the loop and its result

    def loop(self) -> TrainResult:
        cfg = self.cfg
        if self.finished:
            return self.finished_result()
        self.model.train()
        if not self.resumed and self.run_eval():
            self.stopped_by = "callback"
        while self.stopped_by == "budget" and self.budget_left():
            self.train_step()
            if self.step % cfg.eval_every == 0 and self.run_eval():
                self.stopped_by = "callback" if self.stopped_by == "budget" else self.stopped_by
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.checkpoint()
        if self.pending_error is not None:
            raise self.pending_error
        if self.last_eval_step != self.step:
            self.run_eval()
        self.checkpoint()
        return self.result()

    def result(self) -> TrainResult:
        cfg = self.cfg
        # throughput of this call's steps only, so a resumed run reports its own speed
        run_time = self.train_time - self.start_time
        tok_s = len(self.losses) * self.per_step / run_time if run_time > 0 else 0.0
        flops = 3 * cfg.flops_per_token * tok_s if cfg.flops_per_token else None
        losses = [float(v) for v in self.losses]
        recent = [float(v) for v in self.window("loss", self.losses)]
        r = TrainResult(
            steps=self.step, tokens=self.tokens, train_seconds=self.train_time,
            wall_seconds=time.perf_counter() - self.wall0,
            train_loss=float(np.mean(recent)) if recent else float("nan"),
            val=self.evals[-1][1] if self.evals else {},
            first_val=self.evals[0][1] if self.evals else {},
            losses=losses, evals=self.evals, tokens_per_s=tok_s, stopped_by=self.stopped_by,
            flops_per_s=flops, peak_flops_per_s=self.peak,
            mfu=flops / self.peak if flops and self.peak else None,
            checkpoint=self.last_ckpt, metrics_path=self.files.metrics_path,
            aux={k: float(torch.stack(self.window(f"aux/{k}", v)).mean())
                 for k, v in self.aux_steps.items()},
        )
        if self.dist.main and self.out is not None:
            self.files.log({"kind": "summary", "step": self.step, **summary_row(r),
                            "env": run_environment(self.model, self.device, self.ds)})
            self.files.close()
            train_hist, val_hist = self.files.history()
            title = f"{cfg.name or type(self.model).__name__} on {Path(self.ds.name).name}"
            r.plot_path = plot_losses(train_hist, val_hist, self.out / "loss.png", title)
        return r

    def finished_result(self) -> TrainResult:
        """The result of a run resumed after it had finished, read from its files, which are
        left exactly as they were (stopped_by "finished")."""
        metrics = self.out / "metrics.jsonl" if self.out is not None else None
        evals: list[tuple[int, dict[str, float]]] = []
        if metrics is not None and metrics.is_file():
            for line in metrics.read_text().splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    rec = json.loads(line)
                    if rec.get("kind") == "eval":
                        evals.append((rec["step"], {k: v for k, v in rec.items()
                                                    if k not in ("kind", "step")}))
        val = evals[-1][1] if evals else {}
        plot = self.out / "loss.png" if self.out is not None else None
        return TrainResult(
            steps=self.step, tokens=self.tokens, train_seconds=self.train_time,
            wall_seconds=time.perf_counter() - self.wall0,
            train_loss=float(val.get("train_loss") or float("nan")), val=val,
            first_val=evals[0][1] if evals else {}, losses=[], evals=evals, tokens_per_s=0.0,
            stopped_by="finished", checkpoint=self.resumed_from,
            metrics_path=metrics if metrics is not None and metrics.is_file() else None,
            plot_path=plot if plot is not None and plot.is_file() else None,
        )

    def close(self) -> None:
        self.bar.close()
        self.files.close()
