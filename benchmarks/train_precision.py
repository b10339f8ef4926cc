"""Training-step throughput per precision, as a ratio against fp32 in the same process.

    .venv/bin/python benchmarks/train_precision.py [SPEC] [--model NAME] [--batch 16] [--rounds 5]

Rounds interleave the precisions so that load from other processes hits them alike; the
median step time of each is reported, with the loss after the same steps from the same
initial weights (so a precision that changes the numbers shows it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import blockdsl
from blockdsl.train import accumulate_gradients, precision_context, seed_everything
from blockdsl.train.data import load_for_model

PRECISIONS = ("fp32", "fp32-medium", "bf16")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?", default="specs/tiny/gpt.block")
    ap.add_argument("--model", default=None, help="model in the file (default: the last)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per round")
    args = ap.parse_args()
    dev = torch.device("cpu")
    models, opts = {}, {}
    for p in PRECISIONS:
        seed_everything(0)
        models[p] = blockdsl.build(args.spec, args.model, device=dev, precision=p)
        opts[p] = torch.optim.AdamW(models[p].parameters(), lr=1e-3)
    data = load_for_model(models["fp32"])
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    losses: dict[str, float] = {}
    step = 0
    for r in range(args.rounds + 1):  # round 0 warms up
        for p in PRECISIONS:
            m, opt = models[p], opts[p]
            with precision_context(p, dev):
                for s in range(args.steps):
                    x, y = data.train_batch(r * args.steps + s, args.batch, seed=0)
                    t0 = time.perf_counter()
                    loss, _ = accumulate_gradients(m, x, y, 1, p, dev)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if r:
                        times[p].append(time.perf_counter() - t0)
                    losses[p] = float(loss)
        step += args.steps
    tokens = args.batch * (models["fp32"].io.seq if models["fp32"].io.task == "lm" else 1)
    base = statistics.median(times["fp32"])
    name = args.spec + (f":{args.model}" if args.model else "")
    print(f"{name}: batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    for p in PRECISIONS:
        t = statistics.median(times[p])
        print(f"  {p:<12} {t * 1e3:8.1f} ms/step  {tokens / t:9,.0f} tok/s  "
              f"x{base / t:4.2f} vs fp32   loss after {step} steps {losses[p]:.6f}")


if __name__ == "__main__":
    main()
