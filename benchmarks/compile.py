"""Compiled (`torch.compile(fullgraph=True)`, what `train --compile` runs) against eager
training-step time, per spec and precision, in one process.

    .venv/bin/python benchmarks/compile.py [SPEC ...] [--precisions fp32 bf16] [--rounds 5]

For each (spec, precision) the same initial weights are built twice, one copy compiled
(through `blockdsl.train.compiled.compile_for_training`, so MoE layers take the traceable
dispatch a compiled run takes). Round 0 compiles and warms up both and is not timed;
each later round runs `--steps` forward+backward steps (THE `train.step`, no optimizer)
of eager then compiled, so load from other processes hits both alike. Printed: the median
step time of each, the ratio eager / compiled (> 1: compiling pays) with its spread
(min-max of the per-round ratios), the compile time, and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import blockdsl
from blockdsl.lower import random_batch
from blockdsl.train import seed_everything
from blockdsl.train.compiled import compile_for_training
from blockdsl.train.step import step

SPECS = ["specs/tiny/gpt.block", "specs/tiny/vit.block", "specs/tiny/widenet.block",
         "specs/tiny/moeut.block", "specs/tiny/altup.block", "specs/tiny/brainformer.block",
         "benchmarks/specs/gpt-10m.block"]


def bench(spec: str, precision: str, batch: int, seq: int | None, rounds: int,
          steps: int) -> dict[str, float]:
    dev = torch.device("cpu")
    # each (spec, precision) compiles as in a fresh process: without the reset, Dynamo's
    # automatic dynamic shapes treat what changed since the last model (widths, the RoPE
    # fraction) as symbols, and the 10M bf16 model then failed to compile at RoPE's
    # rotated width in the hand-written attention Function
    torch._dynamo.reset()
    seed_everything(0)
    eager = blockdsl.build(spec, device=dev, precision=precision)
    seed_everything(0)
    twin = blockdsl.build(spec, device=dev, precision=precision)
    compiled = compile_for_training(twin)
    plan = blockdsl.resolve(spec)
    x, y = random_batch(plan, batch, dev, seq=seq if plan.task == "lm" else None,
                        generator=torch.Generator().manual_seed(0))
    variants = {"eager": eager, "compiled": compiled}
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    t0 = time.perf_counter()
    step(compiled, x, y, precision=precision, device=dev)  # compiles
    compile_s = time.perf_counter() - t0
    for r in range(rounds + 1):
        for name, m in variants.items():
            ts = []
            for _ in range(steps):
                m.zero_grad(set_to_none=True)
                t = time.perf_counter()
                step(m, x, y, precision=precision, device=dev)
                ts.append(time.perf_counter() - t)
            if r:  # round 0 warms up
                per_round[name].append(statistics.median(ts))
    ratios = [e / c for e, c in zip(per_round["eager"], per_round["compiled"], strict=True)]
    return {"eager_ms": 1e3 * statistics.median(per_round["eager"]),
            "compiled_ms": 1e3 * statistics.median(per_round["compiled"]),
            "ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios),
            "compile_s": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", default=SPECS)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, seq {args.seq}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'spec':38s} {'prec':5s} {'eager ms':>9s} {'compiled':>9s} {'eager/comp':>10s} "
          f"{'spread':>13s} {'compile s':>9s}  load")
    for spec in args.specs:
        for p in args.precisions:
            r = bench(spec, p, args.batch, args.seq, args.rounds, args.steps)
            load = " ".join(f"{v:.1f}" for v in os.getloadavg())
            print(f"{spec:38s} {p:5s} {r['eager_ms']:9.1f} {r['compiled_ms']:9.1f} "
                  f"{r['ratio']:10.2f} {r['lo']:6.2f}-{r['hi']:<6.2f} {r['compile_s']:9.1f}  {load}",
                  flush=True)


if __name__ == "__main__":
    main()
