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
- `keep_host_memory()`: glibc malloc keeps freed tensor memory for reuse (once per process).
"""

from __future__ import annotations

import contextlib
import os
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


# glibc malloc settings for a training process (see keep_host_memory).
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter ids (malloc.h)
_host_memory_kept: bool | None = None


def keep_host_memory() -> bool:
    """Make glibc malloc reuse freed CPU tensor memory instead of returning it to the OS.

    PyTorch's CPU allocator is plain malloc. glibc serves a block over its mmap threshold
    (128 KiB at start, adapting upwards) with a fresh mmap, and gives the top of its heap
    back to the OS past a trim threshold; either way the next tensor of that size faults in
    fresh zeroed pages. A training step allocates and frees the same few hundred KiB
    activations every step, so it pays that again and again, most where shapes vary from
    step to step (MoE dispatch: per-expert loads change every step). Measured (search-scale
    top-2 MoE layer, d 48, 1024 tokens, forward + backward, 1 thread, two runs): 218-269
    minor page faults and 0.5 ms of system time per call before, 2-4 and 0.04 ms after;
    the dense FFN had none either way. Fixed thresholds of MMAP_THRESHOLD and TRIM_THRESHOLD keep blocks below
    64 MiB in the heap and keep up to 256 MiB of freed heap for reuse: the cost is that a
    process's resident memory stays near its peak, which a training process reaches every
    step anyway. The same reason is why PyTorch's CPU tuning guides suggest jemalloc or
    tcmalloc; this needs no preload. Called once per process (by the training step);
    a no-op (False) off glibc, and where the user set MALLOC_/GLIBC_TUNABLES themselves.
    """
    global _host_memory_kept
    if _host_memory_kept is None:
        _host_memory_kept = False
        if (_glibc()
                and not any(k.startswith(("MALLOC_", "GLIBC_TUNABLES")) for k in os.environ)):
            try:
                import ctypes

                libc = ctypes.CDLL(None)
                ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
                _host_memory_kept = ok
            except (OSError, AttributeError):
                pass
    return _host_memory_kept


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a glibc system
        return False


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
