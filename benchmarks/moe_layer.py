"""MoE layer forward+backward: blockdsl dispatch backends vs Hugging Face Mixtral vs a loop.

Like with like: every contender computes the same function — a Mixtral-style sparse MoE
(softmax router, top-k renormalised, gated-SiLU experts w2(silu(x w_gate) * x w_up), no
biases) — from the same weights (copied into the HF block; outputs are checked to agree).
Precision: "fp32" runs everything in fp32; "bf16" runs everything under
torch.autocast(bfloat16) with bf16 parameters on both sides, so neither side pays a
per-step fp32->bf16 weight cast and HF's grouped_mm (which casts its input to the weight
dtype and ignores autocast) really runs in bf16. One extra row per shape shows blockdsl
with fp32 master weights under autocast (what mixed-precision training pays).

Useful FLOPs = 2 N k (3 d d_ff) forward, x3 for forward+backward. "dense%" compares with
the rate of the same gated FFN, forward+backward, on contiguous [N k / E, d] blocks with
each expert's own weights (the matmuls a perfect dispatch would run, measured in this run).
Each contender's time is the median of its timed steps (at least --iters, more while a
table's rounds fit in --budget seconds, at most --max-iters), run round-robin so machine
noise spreads evenly, printed with the min-max spread; "dense%" and "vs HF" are ratios of
medians taken in the same rounds. One slower than SLOW_S per step is timed once (its
warm-up step). /proc/loadavg is printed before and after each table.
Per-expert loops: "blockdsl:loop" (boolean masks + autograd, the numerical reference) and
"hf:eager" (HF's own loop; skipped where its backward would write more than
EAGER_LIMIT_BYTES of full-size weight gradients). HF "batched_mm" materialises one weight
matrix per (token, choice) and is skipped beyond BATCHED_MM_LIMIT_BYTES.
`transformers` is a benchmark-only extra (`pip install transformers`).

    .venv/bin/python benchmarks/moe_layer.py [--iters 5] [--threads N] [--shapes a,b]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Passive OpenMP waiting, unless the caller chose: on a CPU shared with other jobs, spinning
# workers starve the thread they wait for and small-kernel code runs up to 20x slower
# (measured here); it must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockdsl.nn.dispatch import grouped_mm_available  # noqa: E402
from blockdsl.nn.ffn import activate  # noqa: E402
from blockdsl.nn.moe import TopKMoE  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    d_ff: int
    experts: int
    k: int
    tokens: int


SHAPES = {
    "coarse": Shape("coarse", 256, 512, 8, 2, 4096),
    "moeut-44m": Shape("moeut-44m", 412, 128, 155, 12, 4096),
    "moeut-244m": Shape("moeut-244m", 1024, 128, 387, 16, 4096),
}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# HF batched_mm gathers one [2 d_ff, d] weight per (token, choice); skip beyond this.
BATCHED_MM_LIMIT_BYTES = 3e9
EAGER_LIMIT_BYTES = 40e9
SLOW_S = 6.0
INPUTS = 8  # distinct inputs cycled through (see _step)


def _hf_block(s: Shape, ours: TopKMoE, dtype: torch.dtype):
    """A Mixtral sparse-MoE block holding our weights, or None if transformers is absent."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    cfg = MixtralConfig(
        hidden_size=s.d,
        intermediate_size=s.d_ff,
        num_local_experts=s.experts,
        num_experts_per_tok=s.k,
        hidden_act="silu",
        router_jitter_noise=0.0,
    )
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.w1.transpose(1, 2))  # [E, 2f, d], gate half first
        block.experts.down_proj.copy_(ours.w2.transpose(1, 2))  # [E, d, f]
    return block.to(dtype)


def _hf_backends() -> list[str]:
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ["eager"]
    return ["eager", *sorted(ALL_EXPERTS_FUNCTIONS.keys())]


def _step(module: nn.Module, xs: list[torch.Tensor], autocast: bool) -> Callable[[], torch.Tensor | None]:
    """Forward+backward on xs[0], xs[1], ... in turn: every contender sees the same inputs
    in the same order, and each step routes differently, as in training. (One input
    repeated would replay the same per-expert shapes, and on CPU in bf16 oneDNN compiles a
    kernel per new matmul shape: a repeated input hides that cost from unpadded paths.)"""
    params = [p for p in module.parameters()]
    calls = iter(range(1 << 62))

    def run() -> torch.Tensor:
        for p in params:
            p.grad = None
        xi = xs[next(calls) % len(xs)].detach().requires_grad_()
        with torch.autocast(xi.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = module(xi)
        y.float().square().mean().backward()
        return y.detach()

    return run


def _dense_step(s: Shape, w1: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype):
    """Every expert's gated FFN on a contiguous [N k / E, d] block: the matmuls alone."""
    rows = s.tokens * s.k // s.experts
    xs = [torch.randn(rows, s.d, dtype=dtype, requires_grad=True) for _ in range(s.experts)]
    w1s = [w.detach().to(dtype).requires_grad_() for w in w1]  # one leaf per expert
    w2s = [w.detach().to(dtype).requires_grad_() for w in w2]
    grad = torch.ones(rows, s.d, dtype=dtype)

    def run() -> None:
        for xe, a, b in zip(xs, w1s, w2s, strict=True):
            xe.grad = a.grad = b.grad = None
            (activate(xe @ a, "swiglu") @ b).backward(grad)

    return run


def bench_shape(
    s: Shape,
    prec: str,
    iters: int,
    impls: list[str],
    hf_on: bool = True,
    budget_s: float = 20.0,
    max_iters: int = 10,
) -> list[dict]:
    """Rows for one shape and precision: at least `iters` timed round-robin rounds, more
    (up to `max_iters`) while the rounds fit in `budget_s`."""
    dtype = PRECISIONS[prec]
    autocast = prec == "bf16"
    torch.manual_seed(0)
    ours = TopKMoE(s.d, s.d_ff, s.experts, s.k, activation="swiglu", bias=False, renormalize=True)
    xs = [torch.randn(4, s.tokens // 4, s.d) for _ in range(INPUTS)]
    contenders: dict[str, Callable[[], torch.Tensor | None]] = {}
    notes: dict[str, str] = {}
    for impl in impls:
        if impl == "grouped_mm" and not grouped_mm_available("cpu", dtype):
            notes[f"blockdsl:{impl}"] = "unavailable"
            continue
        m = TopKMoE(s.d, s.d_ff, s.experts, s.k, "swiglu", False, renormalize=True, dispatch=impl)
        m.load_state_dict(ours.state_dict())
        contenders[f"blockdsl:{impl}"] = _step(m.to(dtype), [x.to(dtype) for x in xs], autocast)
    if autocast:
        master = TopKMoE(s.d, s.d_ff, s.experts, s.k, "swiglu", False, renormalize=True)
        master.load_state_dict(ours.state_dict())
        contenders["blockdsl:sort[fp32 master]"] = _step(master, xs, True)
    if hf_on and _hf_block(s, ours, dtype) is None:
        print("  transformers not installed: HF rows skipped (pip install transformers)")
    elif hf_on:
        for backend in _hf_backends():
            name = f"hf:{backend}"
            size = torch.finfo(dtype).bits // 8
            gather = s.tokens * s.k * 3 * s.d * s.d_ff * size
            if backend == "batched_mm" and gather > BATCHED_MM_LIMIT_BYTES:
                notes[name] = f"skipped: would gather {gather / 1e9:.0f} GB of expert weights"
                continue
            # HF eager indexes the [E, ...] parameters per expert: its backward writes one
            # full-size weight gradient per expert (E x all expert weights)
            eager_bytes = s.experts * (ours.w1.numel() + ours.w2.numel()) * size
            if backend == "eager" and eager_bytes > EAGER_LIMIT_BYTES:
                notes[name] = f"skipped: backward would write {eager_bytes / 1e9:.0f} GB of weight grads"
                continue
            blk = _hf_block(s, ours, dtype)
            blk.experts.config._experts_implementation = backend
            contenders[name] = _step(blk, [x.to(dtype) for x in xs], autocast)
    dense = _dense_step(s, ours.w1, ours.w2, dtype)
    contenders["dense per-expert FFN"] = dense

    # warm-up step doubling as the agreement check (same weights, same function); for a
    # contender slower than SLOW_S that first step is its only (pessimistic) timing
    times: dict[str, list[float]] = {n: [] for n in contenders}
    warm: dict[str, float] = {}
    ref = None
    for name, fn in list(contenders.items()):
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001  a backend this machine cannot run
            notes[name] = f"unavailable: {type(err).__name__}: {str(err)[:60]}"
            del contenders[name], times[name]
            continue
        warm[name] = time.perf_counter() - t0
        if out is None:
            continue
        ref = out.float() if ref is None else ref
        err = ((out.float() - ref).norm() / ref.norm()).item()  # relative Frobenius
        if err > (1e-4 if dtype == torch.float32 else 5e-2):
            notes[name] = f"differs from blockdsl: rel err {err:.1e}" + (
                " (bf16 router ties)" if dtype == torch.bfloat16 else ""
            )
    for name, t in warm.items():
        if t > SLOW_S:
            times[name].append(t)
            notes[name] = (notes.get(name, "") + " 1 step incl. warm-up").strip()
    fast = {n: fn for n, fn in contenders.items() if warm[n] <= SLOW_S}
    deadline = time.perf_counter() + budget_s
    for i in range(max_iters):
        if i >= iters and time.perf_counter() > deadline:
            break
        for name, fn in fast.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    flops = 3 * 2 * s.tokens * s.k * 3 * s.d * s.d_ff
    best = {n: statistics.median(ts) for n, ts in times.items()}
    dense_rate = flops / best["dense per-expert FFN"]
    hf_names = [n for n in best if n.startswith("hf:")]
    hf_best = min(hf_names, key=best.__getitem__) if hf_names else None
    rows = []
    for name, t in best.items():
        rows.append(
            {
                "shape": s.name,
                "prec": prec,
                "impl": name,
                "ms": 1e3 * t,
                "min_ms": 1e3 * min(times[name]),
                "max_ms": 1e3 * max(times[name]),
                "tok_s": s.tokens / t,
                "gflops": flops / t / 1e9,
                "dense_pct": 100 * flops / t / dense_rate,
                "vs_hf": best[hf_best] / t if hf_best else float("nan"),
                "note": notes.get(name, ""),
            }
        )
    for name, note in notes.items():
        if name not in best:
            rows.append({"shape": s.name, "prec": prec, "impl": name, "note": note})
    if hf_best:
        rows.append({"shape": s.name, "prec": prec, "impl": "(HF best)", "note": hf_best})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5, help="minimum timed steps per contender")
    ap.add_argument("--max-iters", type=int, default=10)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of extra rounds per table")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--impls", default="auto,bmm,sort,grouped_mm,loop", help="blockdsl dispatch backends")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers contenders")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(
        f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"cpus {os.cpu_count()} | torch {torch.__version__} | threads {torch.get_num_threads()} "
        f"| load avg {os.getloadavg()[0]:.1f} | OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    print(
        "dispatch backends: " + args.impls + " (auto: see blockdsl.nn.dispatch.resolve_impl)"
    )
    header = (
        f"{'shape':<11}{'prec':<5}{'impl':<28}{'med ms':>9}{'min-max':>15}{'tok/s':>9}"
        f"{'GFLOP/s':>9}{'dense%':>8}{'vs HF':>7}  note"
    )
    t_start = time.perf_counter()
    for shape in args.shapes.split(","):
        s = SHAPES[shape]
        for prec in args.precisions.split(","):
            print(
                f"\n{s.name}: d={s.d} experts={s.experts}x{s.d_ff} top-{s.k} tokens={s.tokens} "
                f"[{prec}]"
            )
            print(header)
            print(f"  loadavg before: {Path('/proc/loadavg').read_text().split()[:3]}")
            for r in bench_shape(
                s, prec, args.iters, args.impls.split(","), not args.no_hf, args.budget, args.max_iters
            ):
                if "ms" not in r:
                    print(f"{r['shape']:<11}{r['prec']:<5}{r['impl']:<28}{'':>66}  {r['note']}")
                    continue
                print(
                    f"{r['shape']:<11}{r['prec']:<5}{r['impl']:<28}{r['ms']:>9.1f}"
                    f"{r['min_ms']:>8.1f}-{r['max_ms']:<6.1f}{r['tok_s']:>9.0f}{r['gflops']:>9.1f}"
                    f"{r['dense_pct']:>7.0f}%{r['vs_hf']:>6.2f}x  {r['note']}"
                )
            print(f"  loadavg after: {Path('/proc/loadavg').read_text().split()[:3]}")
            sys.stdout.flush()
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
