"""Training's device side: `--device` names, seeding, and the measured matmul rate.

The rules lowering and the tuner need too (`default_device`, `autocast`, `sync`,
`precision_context`, `cpu_name`) live one stage lower, in `blockdsl/device.py`, and are re-exported
here, so every command means the same by `--device auto`, bf16 and a timing boundary.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from blockdsl import files as fileio
from blockdsl.device import autocast, cpu_name, default_device, precision_context, sync
from blockdsl.train.config import TrainError
from blockdsl.train.corpus import cache_dir


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices): call before building a model to fix init."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` (see `default_device`), or a torch device name that this machine has."""
    if name == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise TrainError(f"unknown device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} requested but CUDA is not available")
    return dev


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


_RATES: dict[str, float] = {}


def matmul_rate(device: torch.device, precision: str, cache: Path | None = None) -> float:
    """Measured dense-matmul FLOP/s of this machine at a precision: the MFU denominator.

    Measured rather than looked up because CPU peaks depend on cores, AVX-512/AMX and
    thread count, which no table knows. Measured once per process (0.3 s); the cache file
    keeps the best rate ever seen, so one measurement taken under load does not stick.
    """
    threads = torch.get_num_threads()
    key = f"{_device_name(device)}|{precision}|torch {torch.__version__}|threads {threads}"
    path = (cache or cache_dir()) / "matmul_rate.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in _RATES:
        _RATES[key] = _measure_matmul(device, precision)
        if _RATES[key] > table.get(key, 0.0):
            table[key] = _RATES[key]
            with contextlib.suppress(OSError):
                fileio.atomic_write(path, json.dumps(table, indent=1).encode())
    return max(_RATES[key], float(table.get(key, 0.0)))


def _measure_matmul(device: torch.device, precision: str) -> float:
    n = 2048 if device.type == "cuda" else 1024
    # its own generator: the measurement runs on rank 0 only (for the MFU figure), and a
    # draw from the global RNG there would leave rank 0's stream ahead of the other ranks'
    # (seen: router noise under expert parallelism differed between ranks and from one
    # process, since every rank draws the noise of the whole global batch)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen)
    b = torch.randn(n, n, device=device, generator=gen)
    with precision_context(precision, device), autocast(precision, device):
        for _ in range(2):
            a @ b
        sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.3 or reps < 3:
            a @ b
            reps += 1
        sync(device)
        dt = time.perf_counter() - t0
    return 2 * n**3 * reps / dt


__all__ = ["autocast", "cpu_name", "default_device", "matmul_rate", "precision_context",
           "resolve_device", "seed_everything", "sync"]
