"""The on-disk record of `compile --tune`'s decisions, and the lookup lowering makes in it.

Why a module of its own: lowering reads the cache and the tuner (which builds layers
through lowering) writes it. With the cache inside tune.py, lower.py and tune.py imported
each other; here it sits below both: lower -> tuning_cache, tune -> lower, tuning_cache.

Decisions are keyed by device, torch version, precision and shape (every argument of
the layer but the tuned one), one run per token count.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from blockdsl.device import cpu_name
from blockdsl.files import atomic_write
from blockdsl.plan import LayerPlan
from blockdsl.primitives import get, tunable


def cache_path() -> Path:
    root = os.environ.get("BLOCKDSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blockdsl")
    return Path(root) / "tune.json"


def device_signature(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_name()}:{torch.get_num_threads()}t"


def shape_key(layer: LayerPlan, d: int, seq: int, precision: str, device: torch.device) -> str:
    arg = get(layer.prim).tunable.arg
    args = ",".join(f"{k}={v}" for k, v in sorted(layer.args.items()) if k != arg)
    head = f"{device_signature(device)}|torch={torch.__version__}|{precision}"
    return f"{head}|{layer.prim}|d={d}|seq={seq}|{args}"


_MEMO: dict[str, tuple[float, dict[str, Any]]] = {}


def load() -> dict[str, Any]:
    """The cache file's decisions; re-read only when the file changed (lowering asks per layer)."""
    p = cache_path()
    try:
        mtime = p.stat().st_mtime
        hit = _MEMO.get(str(p))
        if hit and hit[0] == mtime:
            return dict(hit[1])
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    _MEMO[str(p)] = (mtime, data)
    return dict(data)


def save(cache: dict[str, Any]) -> None:
    """Replace the cache file whole (`files.atomic_write`: a killed or concurrent tuner
    leaves the old file or the new one, never a torn or half-shared temporary)."""
    atomic_write(cache_path(), json.dumps(cache, indent=1, sort_keys=True).encode("utf-8"))


def lookup(layer: LayerPlan, d: int, seq: int, precision: str, device: torch.device,
           tokens: int | None = None) -> str | None:
    """The cached choice for this shape, or None (lowering then uses its default rule).

    The best kernel depends on the tokens per step as well (a per-expert loop wins at a few
    hundred tokens, a sorted dispatch at thousands): each tuning run is kept by its token
    count, and `tokens` picks the run nearest on a log scale; without it, the latest run.
    """
    if tunable(layer.prim) is None or os.environ.get("BLOCKDSL_TUNE") == "off":
        return None
    hit = load().get(shape_key(layer, d, seq, precision, device))
    if not hit:
        return None
    runs = hit.get("by_tokens") or {}
    if tokens and runs:
        near = min(runs, key=lambda t: abs(math.log(int(t) / tokens)))
        return runs[near]["choice"]
    return hit["choice"]
