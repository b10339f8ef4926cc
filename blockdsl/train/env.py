"""What a run's numbers depend on besides spec, flags and seed; and the summary row."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blockdsl.primitives import PRIMITIVES
from blockdsl.train.config import TrainResult
from blockdsl.train.device import cpu_name
from blockdsl.version import __version__


def _git_commit(where: Path) -> str | None:
    """The checkout's commit (+ "-dirty" with uncommitted edits), when blockdsl runs from
    one: the version string stays 0.1.0 across commits that change the numbers."""
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel",
                               "--short=12", "HEAD"], capture_output=True, text=True, timeout=5)
        top, _, commit = head.stdout.strip().partition("\n")
        # an installed copy inside some other repository (a venv in a project) is not ours
        if head.returncode != 0 or Path(top).resolve() != where.resolve().parent:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "-uno", "."],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def _kernel_attrs() -> tuple[str, ...]:
    """The module attributes that hold a chosen implementation, read off the registry.

    Each tunable primitive names its implementation argument (`Tunable.arg`); its
    lowering passes it under the module keyword the module keeps it as. Taken from every
    entry, so a registered primitive's kernel is recorded without editing this file.
    """
    attrs = set()
    for prim in PRIMITIVES.values():
        if prim.tunable is not None:
            arg = prim.tunable.arg
            attrs.add(prim.lowering.kwargs.get(arg, arg) if prim.lowering else arg)
    return tuple(sorted(attrs))


def run_environment(model: nn.Module, device: torch.device, ds: Any) -> dict[str, Any]:
    """What a run's numbers depend on besides the spec, the flags and the seed.

    Measured (docs/train.md, "A tiny GPT on the default corpus"): the same seed gives
    bit-identical metrics run after run, and here 1 and 2 threads gave identical ones too;
    but the code version (kernel defaults, e.g. the bf16 attention path), the CPU's
    instruction set (oneDNN's bf16 kernels: `ONEDNN_MAX_CPU_ISA=AVX2` changed the loss in
    the 5th digit at step 0), the kernels `compile --tune` picked, and the corpus (the
    default one is this Python's standard library) each change them. The summary row
    records all of these, so two runs' figures can be told apart before they are compared.
    """
    attrs = _kernel_attrs()
    kernels = sorted({f"{type(m).__name__}.{k}={getattr(m, k)}" for m in model.modules()
                      for k in attrs if isinstance(getattr(m, k, None), str)})
    env: dict[str, Any] = {
        "blockdsl": __version__, "torch": torch.__version__,
        "python": platform.python_version(), "device": str(device),
        "threads": torch.get_num_threads(), "kernels": kernels,
        "data": getattr(ds, "name", None), "data_units": len(getattr(ds, "tokens", ())) or None,
    }
    commit = _git_commit(Path(__file__).resolve().parents[1])  # the blockdsl package
    if commit:
        env["git"] = commit
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = cpu_name()
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        for var in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):  # restrict kernels
            if os.environ.get(var):
                env[var.lower()] = os.environ[var]
    return env


def summary_row(r: TrainResult) -> dict[str, Any]:
    """The JSON-friendly part of a result: the metrics file's last line, and the core of
    `blockdsl train --json`'s summary (public: the loop and the CLI both read it)."""
    return {
        "tokens": r.tokens, "train_seconds": r.train_seconds, "wall_seconds": r.wall_seconds,
        "train_loss": r.train_loss, **r.val, "first_val_loss": r.first_val.get("val_loss"),
        "tokens_per_s": r.tokens_per_s, "flops_per_s": r.flops_per_s,
        "peak_flops_per_s": r.peak_flops_per_s, "mfu": r.mfu, "stopped_by": r.stopped_by,
    }
