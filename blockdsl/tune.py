"""Measure, don't guess: time each implementation of a primitive on the spec's real shapes.

`blockdsl compile --tune` runs `tune_plan`: for every distinct primitive instance whose
implementation is left to blockdsl (`impl=auto` / `dispatch=auto`), each candidate is
built with the same weights, run forward+backward on the spec's shape, checked against
the reference implementation (outputs and input/weight gradients within the stated
tolerance), and timed; the fastest correct one is cached on disk keyed by device, torch
version, precision and shape. `lower.py` reads the cache when it builds a model.

Tolerances (max abs error relative to the reference's max abs value): fp32 1e-4,
bf16 3e-2. A candidate outside tolerance is never chosen, however fast.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from blockdsl.resolve import LayerPlan, Plan

DEFAULT_TOKENS = 4096
TOLERANCE = {"fp32": 1e-4, "fp32-medium": 5e-3, "bf16": 3e-2}
# Per primitive: the argument that names the implementation, the candidates, the reference.
CANDIDATES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "mha": ("impl", ("sdpa", "bmm", "manual"), "manual"),
    "topk": ("dispatch", ("grouped_mm", "sort", "loop"), "loop"),
    "expert_choice": ("dispatch", ("grouped_mm", "sort", "loop"), "loop"),
    "sigma_moe": ("dispatch", ("grouped_mm", "sort", "loop"), "loop"),
    "switchhead": ("dispatch", ("grouped_mm", "sort", "loop"), "loop"),
}


def cache_path() -> Path:
    root = os.environ.get("BLOCKDSL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "blockdsl")
    return Path(root) / "tune.json"


def device_signature(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu:{model}:{torch.get_num_threads()}t"


def shape_key(layer: LayerPlan, d: int, seq: int, precision: str, device: torch.device) -> str:
    arg = CANDIDATES[layer.prim][0]
    args = ",".join(f"{k}={v}" for k, v in sorted(layer.args.items()) if k != arg)
    head = f"{device_signature(device)}|torch={torch.__version__}|{precision}"
    return f"{head}|{layer.prim}|d={d}|seq={seq}|{args}"


_MEMO: dict[str, tuple[float, dict[str, Any]]] = {}


def _load() -> dict[str, Any]:
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


def _save(cache: dict[str, Any]) -> None:
    p = cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(p)


def lookup(layer: LayerPlan, d: int, seq: int, precision: str, device: torch.device,
           tokens: int | None = None) -> str | None:
    """The cached choice for this shape, or None (lowering then uses its default rule).

    The best kernel depends on the tokens per step as well (a per-expert loop wins at a few
    hundred tokens, a sorted dispatch at thousands): each tuning run is kept by its token
    count, and `tokens` picks the run nearest on a log scale; without it, the latest run.
    """
    if layer.prim not in CANDIDATES or os.environ.get("BLOCKDSL_TUNE") == "off":
        return None
    hit = _load().get(shape_key(layer, d, seq, precision, device))
    if not hit:
        return None
    runs = hit.get("by_tokens") or {}
    if tokens and runs:
        near = min(runs, key=lambda t: abs(math.log(int(t) / tokens)))
        return runs[near]["choice"]
    return hit["choice"]


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _run(module: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str):
    """Forward + backward with a fixed seed; returns output and gradients (x, weights)."""
    torch.manual_seed(0)
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    with _autocast(device, precision):
        y = module(xi)
    y.float().square().mean().backward()
    grads = [xi.grad] + [p.grad for p in module.parameters() if p.grad is not None]
    return y.detach().float(), [g.detach().float() for g in grads]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale)


def _time(module, x, device, precision, reps: int) -> float:
    _run(module, x, device, precision)  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _run(module, x, device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tune_layer(
    layer: LayerPlan, plan: Plan, device: torch.device, precision: str, tokens: int = 4096,
    reps: int = 3,
) -> dict[str, Any]:
    """Measure every candidate implementation of one layer; return the decision record."""
    from dataclasses import replace

    from blockdsl.lower import _primitive

    arg, candidates, reference = CANDIDATES[layer.prim]
    seq = plan.seq
    batch = max(1, tokens // seq)
    x = torch.randn(batch, seq, plan.d, device=device)
    torch.manual_seed(0)
    ref_layer = replace(layer, args={**layer.args, arg: reference})
    ref_mod = _primitive(ref_layer, plan.d, 1, device, precision, seq).to(device)
    state = ref_mod.state_dict()
    ref_out, ref_grads = _run(ref_mod, x, device, precision)
    tol = TOLERANCE[precision]
    results: dict[str, Any] = {}
    for cand in candidates:
        try:
            mod = _primitive(
                replace(layer, args={**layer.args, arg: cand}), plan.d, 1, device, precision, seq
            ).to(device)
            mod.load_state_dict(state)
            out, grads = _run(mod, x, device, precision)
            err = max([_rel_err(out, ref_out)] + [_rel_err(g, r) for g, r in zip(grads, ref_grads)])
            if err > tol:
                results[cand] = {"error": err, "ok": False, "why": f"differs from {reference} by {err:.2e}"}
                continue
            results[cand] = {"seconds": _time(mod, x, device, precision, reps), "error": err, "ok": True}
        except (RuntimeError, ValueError, NotImplementedError) as e:
            results[cand] = {"ok": False, "why": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    ok = {c: r for c, r in results.items() if r["ok"]}
    choice = min(ok, key=lambda c: ok[c]["seconds"]) if ok else reference
    return {"choice": choice, "tokens": batch * seq, "precision": precision, "candidates": results}


def tune_plan(
    plan: Plan, device: Any = None, precision: str = "fp32", verbose: bool = True,
    batch: int | None = None,
) -> dict[str, Any]:
    """Tune every auto-implemented layer shape of a plan; cache and return the decisions.

    `batch`: the sequences (images) per training step, so the layers are timed on the
    token count they will see; default DEFAULT_TOKENS tokens.
    """
    tokens = batch * plan.seq if batch else DEFAULT_TOKENS
    dev = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    )
    if precision == "fp32-medium":
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("medium")
    cache = _load()
    decisions: dict[str, Any] = {}
    try:
        for layer in plan.layers:
            if layer.prim not in CANDIDATES or layer.args.get(CANDIDATES[layer.prim][0]) != "auto":
                continue
            key = shape_key(layer, plan.d, plan.seq, precision, dev)
            if key in decisions:
                continue
            rec = tune_layer(layer, plan, dev, precision, tokens=tokens)
            decisions[key] = rec
            runs = dict(cache.get(key, {}).get("by_tokens", {}))
            runs[str(rec["tokens"])] = {"choice": rec["choice"], "candidates": rec["candidates"]}
            cache[key] = {**rec, "by_tokens": runs}
            if verbose:
                parts = []
                for c, r in rec["candidates"].items():
                    if r["ok"]:
                        parts.append(f"{c} {r['seconds'] * 1000:.1f} ms")
                    else:
                        parts.append(f"{c} rejected ({r['why']})")
                print(
                    f"tune {layer.label} ({layer.prim}, {rec['tokens']} tokens, {precision}): "
                    f"chose {rec['choice']} — " + "; ".join(parts)
                )
    finally:
        if precision == "fp32-medium":
            torch.set_float32_matmul_precision(prev)
    _save(cache)
    return decisions
