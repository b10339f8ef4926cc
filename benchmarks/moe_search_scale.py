"""Routed against dense FFN slots at the default search space's scale: whole-model train steps.

The search (search/brainformer.block) trains proxies of width d = 48: a 6-slot cell
(attention, FFN) x 3 stacked 3x, 64-token context, 16 sequences per step, one thread, fp32.
At that size a matmul takes microseconds, so what a routed slot costs beyond its FLOPs is
per-op overhead (router, sort, per-expert kernels, gathers, scatters, host syncs), and the
search weighs that overhead along with MoE's merits. This benchmark measures it: the
baseline cell with its three FFN slots as

    mlp(d_ff=2d)   vs  topk(experts=8, k=2, d_ff=d)    (equal FLOPs per token)
    mlp(d_ff=4d)   vs  topk(experts=8, k=2, d_ff=2d)
    mlp(d_ff=2d)   vs  expert_choice(experts=8, capacity_factor=2, d_ff=d, group=position)

The expert-choice slot has the same FLOPs as topk(d) and every expert exactly full (no
imbalance, no padding, no host sync): the difference between it and topk(d) is what
routing imbalance costs, and its own ratio is the dispatch's cost without it.

(act=gelu, bias=false, the topk primitive's default balance loss, as the search space
writes them), one train step = forward, loss + aux, backward, grad clipping, and the
AdamW step training builds (`train.optim.make_adamw`: fused), exactly the step the search
times (`blockdsl.train.step.step`). Every thread count runs in its own subprocess
(torch.set_num_threads before any work). Contenders run round-robin, the order rotated
each round; a round times `--steps` steps of each and keeps each one's median, and the
reported ratio is the median over `--rounds` rounds with its min-max spread, all ratios
formed within one round of one process. /proc/loadavg is printed before and after: the
machine may be shared. "ops" counts the aten operators one train step dispatches
(TorchDispatchMode, forward + backward + optimizer), the per-op overhead's unit.

    .venv/bin/python benchmarks/moe_search_scale.py [--threads 1,2] [--precisions fp32,bf16]
        [--rounds 7] [--steps 5] [--dispatch auto]   # --dispatch loop,sort,... adds contenders
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Passive OpenMP waiting unless the caller chose (see benchmarks/moe_layer.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPEC = """
model m {{
  d = 48
  stem tokens(vocab=256, context=64, pos=learned)
  head lm(tie=true)
  block cell {{
    s0 mha(heads=4, bias=false)  norm=pre
    s1 {ffn}  norm=pre
    s2 mha(heads=4, bias=false)  norm=pre
    s3 {ffn}  norm=pre
    s4 mha(heads=4, bias=false)  norm=pre
    s5 {ffn}  norm=pre
  }}
  repeat 3 cell
}}
"""
MLP = "mlp(d_ff={f}, act=gelu, bias=false)"
TOPK = "topk(experts=8, k=2, d_ff={f}, act=gelu, bias=false, dispatch={disp})"
EC = ("expert_choice(experts=8, capacity_factor=2, d_ff=d, act=gelu, bias=false, "
      "group=position, dispatch={disp})")
PAIRS = (("mlp(2d)", "topk(d)"), ("mlp(4d)", "topk(2d)"), ("mlp(2d)", "ec(d)"))
BATCH = 16


def contenders(dispatches: list[str]) -> dict[str, str]:
    out = {"mlp(2d)": MLP.format(f="2*d"), "mlp(4d)": MLP.format(f="4*d")}
    for disp in dispatches:
        tag = "" if disp == "auto" else f"[{disp}]"
        out[f"topk(d){tag}"] = TOPK.format(f="d", disp=disp)
        out[f"topk(2d){tag}"] = TOPK.format(f="2*d", disp=disp)
        out[f"ec(d){tag}"] = EC.format(disp=disp)
    return out


def count_ops(step) -> int:
    """Operators dispatched by one call of `step`, counting those inside custom ops too.

    A dispatch mode sees a custom op as one op, so blockdsl's dispatch ops have their
    Python body run under a fresh counter: the aten ops they run are counted as well (the
    op itself counts one, as its launch does).
    """
    from torch._library.custom_ops import OPDEFS
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            if func.namespace == "blockdsl":
                with Count():
                    return OPDEFS[func._schema.name]._init_fn(*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import blockdsl
    from blockdsl.train import precision_context, seed_everything
    from blockdsl.train.data import load_for_model
    from blockdsl.train.optim import make_adamw, param_groups
    from blockdsl.train.step import step

    device = torch.device("cpu")
    specs = contenders(args.dispatch.split(","))
    for precision in args.precisions.split(","):
        models, opts = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, ffn in specs.items():
                p = Path(tmp) / "m.block"
                p.write_text(SPEC.format(ffn=ffn), encoding="utf-8")
                seed_everything(0)
                models[name] = blockdsl.build(str(p), device=device, precision=precision, batch=BATCH)
                opts[name] = make_adamw(param_groups(models[name], 0.1), 1e-4, (0.9, 0.95), device)
        data = load_for_model(next(iter(models.values())))
        n_batches = 8
        batches = [data.train_batch(i, BATCH, seed=0) for i in range(n_batches)]
        times: dict[str, list[list[float]]] = {n: [] for n in models}
        ops: dict[str, int] = {}
        names = list(models)
        with precision_context(precision, device):
            for name in names:  # warm-up: two steps each, then the op count
                for i in range(2):
                    step(models[name], *batches[i],
                        precision=precision, device=device, optimizer=opts[name], clip=1.0)
                m, o, (x, y) = models[name], opts[name], batches[2]
                ops[name] = count_ops(
                    lambda m=m, o=o, x=x, y=y, p=precision: step(m, x, y,
                        precision=p, device=device, optimizer=o, clip=1.0)
                )
            step_i = 0
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    ts = []
                    for s in range(args.steps):
                        x, y = batches[(step_i + s) % n_batches]
                        t0 = time.perf_counter()
                        step(models[name], x, y,
                            precision=precision, device=device, optimizer=opts[name], clip=1.0)
                        ts.append(time.perf_counter() - t0)
                    times[name].append(ts)
                step_i += args.steps
        print(json.dumps({"threads": args.threads, "precision": precision, "ops": ops,
                          "times": times}), flush=True)


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    except OSError:
        return "n/a"


def report(res: dict) -> list[str]:
    """Lines for one (threads, precision) result: per contender ms, ops; per pair ratios."""
    times, ops = res["times"], res["ops"]
    med_round = {n: [statistics.median(ts) for ts in rounds] for n, rounds in times.items()}
    lines = [f"\nthreads {res['threads']}  [{res['precision']}]  (batch {BATCH} x 64 tokens)",
             f"  {'model FFN slots':<22}{'ms/step':>9}{'min':>8}{'max':>8}{'ops/step':>10}"]
    for n, per in med_round.items():
        lines.append(f"  {n:<22}{1e3 * statistics.median(per):>9.2f}{1e3 * min(per):>8.2f}"
                     f"{1e3 * max(per):>8.2f}{ops[n]:>10}")
    lines.append(f"  {'ratio (same rounds)':<22}{'median':>9}{'min':>8}{'max':>8}{'ops':>10}")
    for dense, routed in PAIRS:
        for n in med_round:
            if n == routed or n.startswith(routed + "["):
                ratios = [a / b for a, b in zip(med_round[n], med_round[dense], strict=True)]
                lines.append(f"  {n + ' / ' + dense:<22}{statistics.median(ratios):>8.2f}x"
                             f"{min(ratios):>7.2f}x{max(ratios):>7.2f}x{ops[n] / ops[dense]:>9.1f}x")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (ratio: median of these)")
    ap.add_argument("--steps", type=int, default=5, help="steps per contender per round (median)")
    ap.add_argument("--dispatch", default="auto", help="topk dispatch backends to race (comma list)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.threads = int(args.threads)
        child(args)
        return
    import torch

    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"machine: {platform.platform()} | cpus {os.cpu_count()} | torch {torch.__version__} | "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"rounds {args.rounds} x {args.steps} steps per contender, interleaved; "
          "ms = median over rounds of each round's median step (min, max over rounds)")
    t0 = time.perf_counter()
    for threads in args.threads.split(","):
        before = _load()
        cmd = [sys.executable, __file__, "--child", "--threads", threads, "--precisions",
               args.precisions, "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--dispatch", args.dispatch]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"threads={threads}: child failed:\n{proc.stderr[-2000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                print("\n".join(report(json.loads(line))))
        print(f"  loadavg before {before}, after {_load()}")
        sys.stdout.flush()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
