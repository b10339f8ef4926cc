"""Measure, don't guess: time each implementation of a primitive on the spec's real shapes.

`blockdsl compile --tune [--batch B]` runs `tune_plan`: for every distinct primitive
instance whose implementation is left to blockdsl (`impl=auto` / `dispatch=auto`), each
candidate is built with the same weights, run forward+backward on the spec's shape at
B sequences per step, checked against the reference implementation (outputs and
input/weight gradients within the stated tolerance), and timed round-robin against the
others on a fresh input each round. When the winners differ from lowering's default
rules, a train step of the whole model with them races one with the defaults, and
winners that lose there are not kept. Decisions are cached on disk keyed by device,
torch version, precision and shape, one run per token count (`tuning_cache.py`);
`lower.py` reads the run nearest to the batch it builds for. Which argument is tuned,
its candidates and its reference come from each primitive's registry entry.

Tolerances (max abs error relative to the reference's max abs value): fp32 1e-4,
fp32-medium 5e-3, bf16 3e-2. A candidate outside tolerance is never chosen, however fast.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from blockdsl.device import autocast, default_device, precision_context, sync
from blockdsl.lower import build_from_plan, build_layer, random_batch
from blockdsl.names import PRECISIONS
from blockdsl.plan import LayerPlan, Plan
from blockdsl.primitives import BuildEnv, Tunable, tunable
from blockdsl.tuning_cache import cache_path, device_signature, load, lookup, save, shape_key

# Re-exported: callers have always found the cache's functions here.
__all__ = ["cache_path", "default_choice", "device_signature", "lookup", "shape_key",
           "tune_layer", "tune_plan", "whole_model_check", "with_impls"]

DEFAULT_TOKENS = 4096
# Per-layer winners are kept unless the whole model with them is this much slower.
WHOLE_MODEL_MARGIN = 0.02
TOLERANCE = {"fp32": 1e-4, "fp32-medium": 5e-3, "bf16": 3e-2}
# One tolerance per precision a run may use: a precision added to names.PRECISIONS
# without one fails here, at import, rather than as a KeyError inside `compile --tune`.
assert tuple(TOLERANCE) == PRECISIONS, "tune.TOLERANCE must cover names.PRECISIONS"
# Per primitive, the argument that names the implementation, the candidates and the
# reference are the registry entry's `Tunable`; the cache lives in tuning_cache.py.


def _tunable(name: str) -> Tunable:
    tn = tunable(name)
    if tn is None:
        raise ValueError(f"primitive {name!r} has no tunable implementation")
    return tn


def _env(plan: Plan, device: torch.device, precision: str, n_applications: int = 1) -> BuildEnv:
    return BuildEnv(d=plan.d, n_applications=n_applications, device=device,
                    precision=precision, seq=plan.seq)


def _run(module: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str):
    """Forward + backward with a fixed seed; returns output and gradients (x, weights)."""
    torch.manual_seed(0)
    module.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    with autocast(precision, device):
        y = module(xi)
    y.float().square().mean().backward()
    grads = [xi.grad] + [p.grad for p in module.parameters() if p.grad is not None]
    return y.detach().float(), [g.detach().float() for g in grads]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale)


def _race(runs: dict[str, Any], device: torch.device, rounds: int) -> dict[str, float]:
    """Best seconds of each callable over `rounds` round-robin rounds (after one warm-up each).

    Round-robin, order rotated every round, so load from other processes hits every
    candidate alike; the minimum is the time least inflated by it (load only adds time).
    Each callable gets the round number (0 is the warm-up), so that candidates can see a
    fresh input every round, as training does: with one input repeated, routed layers
    would see the same per-expert shapes again and again, which flatters kernels whose
    cost is compiling a new shape (oneDNN on CPU).
    """
    names = list(runs)
    if not names:
        return {}
    for n in names:
        runs[n](0)
    best = {n: float("inf") for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            runs[n](r + 1)
            sync(device)
            best[n] = min(best[n], time.perf_counter() - t0)
    return best


def tune_layer(
    layer: LayerPlan, plan: Plan, device: torch.device, precision: str, tokens: int = 4096,
    rounds: int = 5,
) -> dict[str, Any]:
    """Measure every candidate implementation of one layer; return the decision record."""
    tn = _tunable(layer.prim)
    arg, candidates, reference = tn.arg, tn.candidates, tn.reference
    env = _env(plan, device, precision)
    seq = plan.seq
    batch = max(1, tokens // seq)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, seq, plan.d, generator=gen).to(device) for _ in range(rounds + 1)]
    x = xs[0]
    torch.manual_seed(0)
    ref_layer = replace(layer, args={**layer.args, arg: reference})
    ref_mod = build_layer(ref_layer, env).to(device)
    state = ref_mod.state_dict()
    ref_out, ref_grads = _run(ref_mod, x, device, precision)
    tol = TOLERANCE[precision]
    results: dict[str, Any] = {}
    runs = {}
    for cand in candidates:
        try:
            mod = build_layer(replace(layer, args={**layer.args, arg: cand}), env).to(device)
            mod.load_state_dict(state)
            out, grads = _run(mod, x, device, precision)
            err = max([_rel_err(out, ref_out)] + [_rel_err(g, r) for g, r in zip(grads, ref_grads)])
            if err > tol:
                results[cand] = {"error": err, "ok": False, "why": f"differs from {reference} by {err:.2e}"}
                continue
            results[cand] = {"error": err, "ok": True}
            runs[cand] = lambda r, m=mod: _run(m, xs[r], device, precision)
        except (RuntimeError, ValueError, NotImplementedError) as e:
            results[cand] = {"ok": False, "why": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    for cand, sec in _race(runs, device, rounds).items():
        results[cand]["seconds"] = sec
    ok = {c: r for c, r in results.items() if r["ok"]}
    choice = min(ok, key=lambda c: ok[c]["seconds"]) if ok else reference
    return {"choice": choice, "tokens": batch * seq, "precision": precision, "candidates": results}


def default_choice(layer: LayerPlan, device: torch.device, precision: str, seq: int,
                   d: int | None = None) -> str:
    """What lowering picks for this layer with no measurement (its entry's default rule)."""
    env = BuildEnv(d=d or 0, n_applications=1, device=device, precision=precision, seq=seq)
    return _tunable(layer.prim).default(layer.args, env)


@contextmanager
def _cache_ignored() -> Iterator[None]:
    prev = os.environ.get("BLOCKDSL_TUNE")
    os.environ["BLOCKDSL_TUNE"] = "off"
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("BLOCKDSL_TUNE", None)
        else:
            os.environ["BLOCKDSL_TUNE"] = prev


def with_impls(plan: Plan, pick: Callable[[LayerPlan], str | None]) -> Plan:
    """The plan with each `auto` implementation argument set to `pick(layer)` (None keeps it).

    Explicit `impl=` / `dispatch=` arguments stay as written, as in lowering.
    """
    layers = []
    for layer in plan.layers:
        tn = tunable(layer.prim)
        if tn is not None:
            choice = pick(layer) if layer.args.get(tn.arg) == "auto" else None
            if choice is not None:
                layer = replace(layer, args={**layer.args, tn.arg: choice})
        layers.append(layer)
    return replace(plan, layers=type(plan.layers)(layers))


def whole_model_check(plan: Plan, choices: dict[str, str], device: torch.device, precision: str,
                      batch: int, rounds: int = 4) -> dict[str, float]:
    """Best train-step seconds (forward + backward) of the model with `choices` and with the
    default rules, same weights and batch, raced round-robin.

    Per-layer timings miss what only the whole model shows (shared layers applied several
    times, caches, allocation): a set of choices that loses here is not kept.
    """
    # Lazy: only this race needs a training step; per-layer tuning does not.
    from blockdsl.train.step import step

    data = [random_batch(plan, batch, device, generator=torch.Generator().manual_seed(r))
            for r in range(rounds + 1)]
    with _cache_ignored():
        torch.manual_seed(0)
        keyed = with_impls(plan, lambda la: choices.get(shape_key(la, plan.d, plan.seq, precision, device)))
        tuned = build_from_plan(keyed, device, precision)
        torch.manual_seed(0)
        default = build_from_plan(plan, device, precision)

    def train_step(m: torch.nn.Module):
        def run(r: int) -> None:  # the training step without the update: both keep their weights
            step(m, *data[r], precision=precision, device=device)
            m.zero_grad(set_to_none=True)

        return run

    best = _race({"tuned": train_step(tuned), "default": train_step(default)}, device, rounds)
    return {"tuned_s": best["tuned"], "default_s": best["default"], "batch": batch}


def tune_plan(
    plan: Plan, device: Any = None, precision: str = "fp32", verbose: bool = True,
    batch: int | None = None, whole_model: bool = True,
) -> dict[str, Any]:
    """Tune every auto-implemented layer shape of a plan; cache and return the decisions.

    `batch`: the sequences (images) per training step, so the layers are timed on the
    token count they will see; default DEFAULT_TOKENS tokens. With `whole_model`, when
    the per-layer winners differ from the default rules, a train step of the whole model
    with them races one with the defaults; if the winners lose by more than
    WHOLE_MODEL_MARGIN, the defaults are recorded instead (with both times).
    """
    batch = batch or max(1, DEFAULT_TOKENS // plan.seq)
    dev = torch.device(device) if device is not None else default_device()
    decisions: dict[str, Any] = {}
    with precision_context(precision, dev):
        for layer in plan.layers:
            tn = tunable(layer.prim)
            if tn is None or layer.args.get(tn.arg) != "auto":
                continue
            key = shape_key(layer, plan.d, plan.seq, precision, dev)
            if key in decisions:
                continue
            rec = tune_layer(layer, plan, dev, precision, tokens=batch * plan.seq)
            rec["default"] = default_choice(layer, dev, precision, plan.seq, plan.d)
            decisions[key] = rec
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
        differs = any(r["choice"] != r["default"] for r in decisions.values())
        if whole_model and differs:
            chk = whole_model_check(plan, {k: r["choice"] for k, r in decisions.items()}, dev,
                                    precision, batch)
            keep = chk["tuned_s"] <= (1 + WHOLE_MODEL_MARGIN) * chk["default_s"]
            for rec in decisions.values():
                rec["whole_model"] = {**chk, "kept": keep}
                if not keep:
                    rec["layer_choice"], rec["choice"] = rec["choice"], rec["default"]
            if verbose:
                print(
                    f"tune whole model ({batch} x {plan.seq} tokens): tuned "
                    f"{chk['tuned_s'] * 1000:.1f} ms vs defaults {chk['default_s'] * 1000:.1f} ms "
                    f"per step: " + ("keeping the tuned choices" if keep else "keeping the defaults")
                )
    cache = load()
    for key, rec in decisions.items():
        runs = dict(cache.get(key, {}).get("by_tokens", {}))
        runs[str(rec["tokens"])] = {"choice": rec["choice"], "candidates": rec["candidates"]}
        cache[key] = {**rec, "by_tokens": runs}
    save(cache)
    return decisions
