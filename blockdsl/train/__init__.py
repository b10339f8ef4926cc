"""Training: `train(model, TrainConfig(...))`, the library function the CLI and the search call.

A package of modules with one job each; this file only re-exports the names callers
import (`from blockdsl.train import train, TrainConfig, ...`):

- config: TrainConfig, TrainResult, TrainError        - device: device, precision, seed, sync
- step: THE training step (`step`)                     - optim: AdamW groups, lr schedule
- loop: `train` and the run around the step           - evaluate: validation metrics
- checkpoint: checkpoint folders                       - runfiles: metrics.jsonl, loss.png
- dist: torchrun data parallel                         - progress: progress bar, Ctrl-C
- memory: the memory guard                             - env: run environment, summary row
- corpus, data, tokdata: data sets                     - tblog: TensorBoard event files
- spec: `train_spec`, a .block spec built and trained (what `blockdsl train` runs)

`spec` is not imported here: it imports `blockdsl.lower` (the nn modules), which a
caller that brings its own model does not need. Every name imported below is public.
"""

from __future__ import annotations

from blockdsl.train.checkpoint import (
    CKPT_PREFIX,
    LATEST,
    checkpoint_folders,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from blockdsl.train.config import PRECISIONS, EvalCallback, TrainConfig, TrainError, TrainResult
from blockdsl.train.device import (
    autocast,
    default_device,
    matmul_rate,
    precision_context,
    resolve_device,
    seed_everything,
    sync,
)
from blockdsl.train.env import run_environment, summary_row
from blockdsl.train.loop import train
from blockdsl.train.memory import available_memory, memory_guard
from blockdsl.train.optim import lr_at, make_adamw, param_groups
from blockdsl.train.runfiles import plot_losses

# `step` and `evaluate` are not re-exported: the functions would shadow their modules
# (`blockdsl.train.step`); import them from there.
from blockdsl.train.step import StepResult, accumulate_gradients, task_loss
