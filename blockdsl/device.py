"""Where and how numbers are computed: the default device, precision, timing boundaries.

One home for rules that were written two or three times (train, tune, lower), so that
`--device auto`, bf16 autocast and "wait for the GPU before reading the clock" mean the
same thing in every command. Below lowering (which picks the default device) and above
nothing but torch, so lowering, the tuner and training all import it without a cycle:
- `default_device()`: CUDA when present, else the CPU.
- `precision_context(precision, device)`: fp32-medium's matmul precision, restored after.
- `autocast(precision, device)`: bf16 autocast with fp32 master weights, or nothing.
- `sync(device)`: a timing boundary; a no-op on the CPU, where work is synchronous.
- `cpu_name()`: the CPU's model name, as the tuning cache's key and a run's record give it.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def default_device() -> torch.device:
    """The device `auto` means: CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Set float32 matmul precision for the run and restore the caller's afterwards."""
    prev = torch.get_float32_matmul_precision()
    if precision == "fp32-medium":
        torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast (fp32 master weights) or nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    """The CPU's model name ("model name" in /proc/cpuinfo), else what `platform` says.

    One reader for the tuning cache's device key and the run environment's record, so
    both name a machine alike; the key is stored in tune.json, so its text must not change.
    """
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
