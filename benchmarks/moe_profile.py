"""Where a routed slot's step time goes: op-by-op profile of the search-scale train step.

Builds the two models of benchmarks/moe_search_scale.py (the baseline cell with its FFN
slots as `topk(experts=8, k=2, d_ff=d)` and as `mlp(d_ff=2d)`), runs `--steps` train
steps of each under torch.profiler (interleaved, after a warm-up), and prints per aten op
the calls and self-CPU microseconds per step of each model, sorted by the difference:
the rows at the top are what the routed model pays beyond the dense one. Self time is
measured under load like any wall time, so read it next to the call counts, which are
load-independent.

    .venv/bin/python benchmarks/moe_profile.py [--precision fp32] [--threads 1] [--steps 20]
        [--ffn 'topk(experts=8, k=2, d_ff=d, act=gelu, bias=false)'] [--top 40]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from moe_search_scale import BATCH, MLP, SPEC  # noqa: E402

TOPK = "topk(experts=8, k=2, d_ff=d, act=gelu, bias=false)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ffn", default=TOPK, help="the routed FFN slot")
    ap.add_argument("--dense", default=MLP.format(f="2*d"), help="the dense FFN slot")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    import blockdsl
    from blockdsl.train import precision_context, seed_everything
    from blockdsl.train.data import load_for_model
    from blockdsl.train.optim import make_adamw, param_groups
    from blockdsl.train.step import step

    dev = torch.device("cpu")
    models, opts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ffn in (("moe", args.ffn), ("dense", args.dense)):
            p = Path(tmp) / "m.block"
            p.write_text(SPEC.format(ffn=ffn), encoding="utf-8")
            seed_everything(0)
            models[name] = blockdsl.build(str(p), device=dev, precision=args.precision, batch=BATCH)
            opts[name] = make_adamw(param_groups(models[name], 0.1), 1e-4, (0.9, 0.95), dev)
    data = load_for_model(models["moe"])
    batches = [data.train_batch(i, BATCH, seed=0) for i in range(8)]
    stats: dict[str, dict[str, list[float]]] = {}
    with precision_context(args.precision, dev):
        for name in models:
            for i in range(3):
                step(models[name], *batches[i],
                    precision=args.precision, device=dev, optimizer=opts[name], clip=1.0)
        for name in models:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for s in range(args.steps):
                    step(models[name], *batches[s % 8],
                        precision=args.precision, device=dev, optimizer=opts[name], clip=1.0)
            agg: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
            for ev in prof.key_averages():
                if not ev.key.startswith("aten::"):
                    continue
                agg[ev.key][0] += ev.count / args.steps
                agg[ev.key][1] += ev.self_cpu_time_total / args.steps
            stats[name] = agg
    keys = set(stats["moe"]) | set(stats["dense"])
    z = [0, 0.0]
    rows = sorted(keys, key=lambda k: -(stats["moe"].get(k, z)[1] - stats["dense"].get(k, z)[1]))
    tot = {n: (sum(v[0] for v in s.values()), sum(v[1] for v in s.values())) for n, s in stats.items()}
    print(f"precision {args.precision}, {args.threads} thread(s), {args.steps} steps; "
          f"loadavg {Path('/proc/loadavg').read_text().split()[:3]}")
    print(f"{'aten op':<40}{'moe calls':>10}{'moe us':>9}{'dense calls':>12}{'dense us':>9}{'diff us':>9}")
    for k in rows[: args.top]:
        m, d = stats["moe"].get(k, z), stats["dense"].get(k, z)
        print(f"{k:<40}{m[0]:>10.0f}{m[1]:>9.0f}{d[0]:>12.0f}{d[1]:>9.0f}{m[1] - d[1]:>9.0f}")
    print(f"{'total (self, aten::*)':<40}{tot['moe'][0]:>10.0f}{tot['moe'][1]:>9.0f}"
          f"{tot['dense'][0]:>12.0f}{tot['dense'][1]:>9.0f}{tot['moe'][1] - tot['dense'][1]:>9.0f}")


if __name__ == "__main__":
    main()
