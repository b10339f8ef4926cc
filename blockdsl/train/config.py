"""What a training run is told and what it returns: TrainConfig, TrainResult, TrainError.

Plain data with no torch import, so the CLI, the search and the loop share one
definition of every knob and its default, and `validate` rejects a bad one before any
process group, model move or data load happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from blockdsl.names import PRECISIONS, SHARDING

EvalCallback = Callable[[int, dict[str, float]], "bool | None"]
"""`on_eval(step, metrics) -> bool | None`: called on rank 0 after each evaluation.

`metrics` holds `val_loss` (and `val_bpb` for byte-level text, `val_acc` for classifiers),
plus `train_loss`, `tokens`, `train_seconds`. Return True to stop training after this
step; an exception (e.g. optuna.TrialPruned) stops training on every rank and is re-raised.
"""


class TrainError(Exception):
    """A problem the user can fix (data, spec/data mismatch, output folder, checkpoint)."""

    @property
    def cli_message(self) -> str:
        """The one line the CLI prints instead of a traceback."""
        return str(self)


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model. Budgets: the first one hit stops."""

    data: str | Path | None = None  # file/folder; None = default corpus or digits
    steps: int | None = None
    tokens: int | None = None  # tokens for LMs, images for classifiers
    seconds: float | None = None  # training time, excluding evaluation and checkpoints
    batch_size: int = 16  # global sequences/images per optimizer step
    seq_len: int | None = None  # None = the model's seq_len; may only be shorter
    accum: int = 1  # micro-steps the per-rank share of a batch is split into
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20  # steps of linear warm-up
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "bf16"
    eval_every: int = 50
    eval_batches: int | None = 8  # None = the whole validation split
    log_every: int = 10
    seed: int = 0
    out: str | Path | None = None  # run folder: metrics, plot, checkpoints; None writes nothing
    ckpt_every: int | None = None  # steps; a checkpoint is also written at the end and on Ctrl-C
    keep_checkpoints: int = 2
    resume: bool = False  # continue from out/latest if it exists
    device: str = "auto"
    quiet: bool = False
    progress: bool | None = None  # None = on when stderr is a TTY and not quiet
    flops_per_token: float | None = None  # forward FLOPs per token (LM) or image, for MFU
    name: str | None = None  # what the run is called in the plot (default: model class)
    tensorboard: str | Path | None = None  # folder for TensorBoard event files (rank 0); None: none
    shard: str = "none"  # "fsdp": FSDP2 over all ranks (train/parallel.py)
    ep: int = 1  # expert parallelism: ranks each routed layer's experts are split over
    compile: bool | None = None  # torch.compile the step's model; None: the device's measured default


@dataclass
class TrainResult:
    """What a run achieved; `losses` has one train loss per step run by this call."""

    steps: int
    tokens: int
    train_seconds: float
    wall_seconds: float
    train_loss: float
    val: dict[str, float]
    first_val: dict[str, float]
    losses: list[float]
    evals: list[tuple[int, dict[str, float]]]
    tokens_per_s: float
    stopped_by: str  # "budget", "callback", "interrupt"; "finished": resumed with no budget left
    flops_per_s: float | None = None
    peak_flops_per_s: float | None = None
    mfu: float | None = None
    checkpoint: Path | None = None
    metrics_path: Path | None = None
    plot_path: Path | None = None
    aux: dict[str, float] = field(default_factory=dict)


def validate(cfg: TrainConfig) -> None:
    """Raise a TrainError naming the first knob out of range."""
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"precision {cfg.precision!r} is not one of {', '.join(PRECISIONS)}")
    for name in ("steps", "tokens", "seconds", "eval_every", "log_every", "ckpt_every"):
        v = getattr(cfg, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise TrainError(f"{name} must be a positive finite number, got {v}")
    if cfg.batch_size < 1 or cfg.accum < 1:
        raise TrainError(f"batch_size ({cfg.batch_size}) and accum ({cfg.accum}) must be >= 1")
    if cfg.shard not in SHARDING:
        raise TrainError(f"shard {cfg.shard!r} is not one of {', '.join(SHARDING)}")
    if cfg.ep < 1:
        raise TrainError(f"ep must be >= 1, got {cfg.ep}")
    if cfg.warmup < 0:
        raise TrainError(f"warmup must be >= 0, got {cfg.warmup}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise TrainError(f"lr must be a positive finite number, got {cfg.lr}")
    for name in ("weight_decay", "grad_clip", "min_lr_ratio"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise TrainError(f"{name} must be a finite number >= 0, got {v}")
