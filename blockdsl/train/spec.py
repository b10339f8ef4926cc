"""Train a `.block` spec: resolve it, check data and memory, build, and call `train`.

What `blockdsl train SPEC` does besides parsing flags and printing, as one library
function, so the CLI stays argument parsing and a Python caller gets the same checks in
the same order. The order is the point: everything that can be refused cheaply (the
device, token data against the spec's vocabulary, the memory estimate) is refused before
the model is built, which for a large spec takes minutes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from blockdsl.graph import report
from blockdsl.lang.errors import BlockError
from blockdsl.lang.parse import load_module
from blockdsl.lang.resolve import resolve
from blockdsl.lower import build_from_plan
from blockdsl.plan import Plan
from blockdsl.train.checkpoint import LATEST
from blockdsl.train.config import TrainConfig, TrainError, TrainResult
from blockdsl.train.data import DataError, load_for_model
from blockdsl.train.device import resolve_device, seed_everything
from blockdsl.train.loop import train
from blockdsl.train.memory import memory_guard
from blockdsl.train.tokdata import VocabMismatch, is_token_source


@dataclass
class SpecRun:
    """A trained spec: the result, the run folder it used, and the model's task."""

    result: TrainResult
    out: Path
    task: str


def fresh_out(name: str) -> Path:
    """runs/<model>, or runs/<model>-2, -3, ... so a second run never overwrites the first.

    Named by the model, not the file stem: one file can hold several models, and the
    stem (`gpt`) need not be the model's name (`gpt_tiny`)."""
    base = Path("runs") / name
    out, n = base, 1
    while (out / LATEST).exists():
        n += 1
        out = base.with_name(f"{name}-{n}")
    return out


def token_data(plan: Plan, source: str | Path | None, seq: int | None,
               dtype: str | None) -> Any:
    """Token-id data (`source` a .bin or a tokenized folder), loaded and checked against the
    spec before the model is built: a vocabulary mismatch is a located error at the model
    (exit 1) rather than a failure after minutes of building. None for any other data."""
    is_tokens = plan.task == "lm" and is_token_source(source)
    if not is_tokens:
        if dtype is not None:
            raise TrainError(f"--data-dtype applies to token ids (a .bin file, or a folder "
                             f"with train.bin), not to {source or 'the default data'}")
        return None
    try:
        return load_for_model(plan.io, source, seq, dtype)
    except VocabMismatch as e:
        raise BlockError(e.message, plan.span, e.hint) from None
    except DataError as e:
        raise TrainError(str(e)) from None


def train_spec(spec: str | Path, model: str | None, config: TrainConfig, *,
               default_steps: int, data_dtype: str | None = None, force: bool = False,
               tensorboard: bool = False) -> SpecRun:
    """Build the spec's `model` and train it with `config`; see the module docstring.

    From the spec, `config` gets: the resolved device (under torchrun, this rank's GPU),
    `out` when None (runs/<model>: numbered when taken, itself when resuming), the FLOPs
    per token (per image for a classifier) for MFU, the model's name, `<out>/tb` when
    `tensorboard`, and `default_steps` when it names no budget. The seed is set before
    the build, so it fixes the initial weights too. Raises TrainError (a one-line user
    mistake) or BlockError (located at the spec).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = resolve_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    seed_everything(config.seed)  # fixes the initial weights too
    # Kernels tuned by `compile --tune --batch` for the nearest per-device batch are used.
    micro = max(1, config.batch_size // max(1, config.accum) // world)
    plan = resolve(load_module(spec), model)
    dataset = token_data(plan, config.data, config.seq_len, data_dtype)  # before building
    out = config.out
    if out is None:
        out = Path("runs") / plan.name if config.resume else fresh_out(plan.name)
    # refuse before building: a model or batch far beyond the machine would otherwise
    # swap or die in the allocator (one micro-batch is what a process holds at once)
    memory_guard(plan, batch=micro, seq=config.seq_len, precision=config.precision,
                 optimizer=True, device=device, force=force, what="train",
                 hint="use a smaller --batch (or a larger --accum) or --seq, "
                 "or pass --force to try anyway")
    built = build_from_plan(plan, device=device, precision=config.precision, batch=micro)
    rep = report(plan)
    # the report counts per token; a classifier's unit of throughput is one image
    flops = float(rep.flops_per_token) * (rep.seq if built.io.task == "classify" else 1)
    cfg = replace(config, out=out, device=str(device), flops_per_token=flops, name=rep.name,
                  tensorboard=Path(out) / "tb" if tensorboard else None)
    if cfg.steps is None and cfg.tokens is None and cfg.seconds is None:
        cfg.steps = default_steps
    return SpecRun(train(built, cfg, dataset=dataset), Path(out), built.io.task)
