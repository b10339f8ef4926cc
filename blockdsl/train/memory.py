"""Refuse a step that cannot fit before anything is allocated (`memory_guard`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from blockdsl.graph import estimate_memory, human_bytes
from blockdsl.lang.errors import BlockError


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Bytes a new allocation can get on `device`, and where the number came from.

    CUDA: the device's free memory. CPU (Linux): MemAvailable from /proc/meminfo, lowered
    to a cgroup's remaining limit when one is set (a container's MemAvailable shows the
    host's memory). Elsewhere (None, reason): the guard is skipped.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    if device.type != "cpu":
        return None, f"no way to read free memory on {device.type}"
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None, "no /proc/meminfo on this system"
    avail = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                  if line.startswith("MemAvailable:")), None)
    if avail is None:
        return None, "no MemAvailable in /proc/meminfo"
    source = "MemAvailable"
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        with contextlib.suppress(OSError, ValueError):
            left = int(Path(limit).read_text()) - int(Path(usage).read_text())
            if left < avail:
                avail, source = max(left, 0), "the cgroup's memory limit"
    return avail, source


def memory_guard(plan: Any, *, batch: int, seq: int | None, precision: str, optimizer: bool,
                 device: torch.device, force: bool, what: str, hint: str) -> Any:
    """Refuse (a located BlockError, exit 1) a step whose estimated memory exceeds what the
    device has, before anything is allocated; `force` skips the refusal.

    The estimate (`graph.estimate_memory`) is deliberately on the high side, so a refused
    run may in fact fit: `--force` is the way to try. Several processes of one torchrun on
    a CPU host share its memory, so there the estimate counts once per local process.
    """
    est = estimate_memory(plan, batch, seq, precision, optimizer=optimizer,
                          device_type=device.type)
    if force:
        return est
    avail, source = available_memory(device)
    if avail is None:
        return est
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    need = est.total * procs
    if need <= avail:
        return est
    each = f" x {procs} processes" if procs > 1 else ""
    raise BlockError(
        f"{what} of model {plan.name} needs about {human_bytes(need)} at batch {est.batch} x "
        f"seq {est.seq} ({precision}{each}: {est.parts()}), more than the "
        f"{human_bytes(avail)} available on {device.type} ({source})",
        plan.span, hint,
    )
