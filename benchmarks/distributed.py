"""Distributed training on this machine: tokens/s at 1, 2 and 4 processes, bytes per rank.

    .venv/bin/python benchmarks/distributed.py [--rounds 3] [--steps 12] [--batch 16] [--seq 32]

Each round launches torchrun (gloo, CPU, one thread per process) at 1, 2 and 4 processes;
inside a launch every case trains the same steps through `blockdsl train`'s own path
(`train_spec`), so the figures include what a real run pays (data slicing, the loss
all-reduce, evaluation excluded). Reported per case: the median tokens/s over rounds with
its min-max spread, the ratio to the same model in one process (same run), and this
rank's parameter and AdamW-state bytes (a DTensor shard counts its local part), and the
expert parameters each rank holds (with FSDP + EP 2 x DP 2: a quarter, its EP block's rows
sharded over dp). The all-to-all overhead is the EP run's step time over
the same model's plain data-parallel run at the same process count.

The machine's core count bounds what more processes can give: with 2 cores, 4 processes
share 2 cores and cannot be faster than 2; that is printed, not hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT = str(ROOT / "specs/tiny/gpt.block")
ROUTED = str(ROOT / "tests/specs/dist_routed.block")
CASES = {  # process count -> (label, spec, shard, ep)
    1: [("gpt", GPT, "none", 1), ("routed", ROUTED, "none", 1)],
    2: [("gpt", GPT, "none", 1), ("gpt", GPT, "fsdp", 1),
        ("routed", ROUTED, "none", 1), ("routed", ROUTED, "none", 2)],
    4: [("gpt", GPT, "none", 1), ("gpt", GPT, "fsdp", 1),
        ("routed", ROUTED, "none", 1), ("routed", ROUTED, "none", 2),
        ("routed", ROUTED, "fsdp", 2)],
}


def worker(cases_file: str, out_file: str, steps: int, batch: int, seq: int) -> None:
    """One launch: train every case of this process count; rank 0 writes the figures."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from blockdsl.train import loop as loop_mod
    from blockdsl.train import spec as spec_mod
    from blockdsl.train.config import TrainConfig

    dist.init_process_group("gloo")
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    results = []
    for label, spec, shard, ep in json.loads(Path(cases_file).read_text()):
        seen: dict = {}
        make, train = loop_mod.make_adamw, spec_mod.train

        def spy_opt(*a, **k):  # noqa: ANN002, ANN003, ANN202
            seen["opt"] = make(*a, **k)
            return seen["opt"]

        def spy_train(model, cfg, **kw):  # noqa: ANN001, ANN003, ANN202
            seen["model"] = model
            return train(model, cfg, **kw)

        loop_mod.make_adamw, spec_mod.train = spy_opt, spy_train
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = TrainConfig(steps=steps, batch_size=batch, seq_len=seq, precision="fp32",
                                  eval_every=10**6, eval_batches=1, warmup=2, out=Path(tmp) / "r",
                                  device="cpu", quiet=True, shard=shard, ep=ep)
                run = spec_mod.train_spec(spec, None, cfg, default_steps=steps)
        finally:
            loop_mod.make_adamw, spec_mod.train = make, train
        model, opt = seen["model"], seen["opt"]
        pbytes = sum(local(p).numel() * p.element_size() for p in model.parameters())
        obytes = sum(local(v).numel() * v.element_size() for st in opt.state.values()
                     for v in st.values() if torch.is_tensor(v))
        experts = sum(local(p).numel() for m in model.modules() if getattr(m, "ep", None) is not None
                      for n, p in m.named_parameters(recurse=False)
                      if n in {"w1", "b1", "w2", "b2", "keys", "values", "v", "o"})
        results.append({"label": label, "shard": shard, "ep": ep,
                        "tok_s": run.result.tokens_per_s, "param_bytes": pbytes,
                        "optim_bytes": obytes, "expert_elems": experts})
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def launch(n: int, steps: int, batch: int, seq: int, tmp: Path) -> list[dict]:
    cases, out = tmp / f"c{n}.json", tmp / f"o{n}.json"
    cases.write_text(json.dumps(CASES[n]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={n}", __file__, "--worker", str(cases), str(out),
                    str(steps), str(batch), str(seq)], env=env, check=True, cwd=tmp)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    load0 = os.getloadavg()
    tok: dict[tuple, list[float]] = {}
    last: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as t:
        for _ in range(args.rounds):  # each round runs every process count once
            for n in CASES:
                for r in launch(n, args.steps, args.batch, args.seq, Path(t)):
                    key = (n, r["label"], r["shard"], r["ep"])
                    tok.setdefault(key, []).append(r["tok_s"])
                    last[key] = r
    load1 = os.getloadavg()
    print(f"distributed training, gloo on CPU, {os.cpu_count()} cores, 1 thread per process; "
          f"batch {args.batch} x seq {args.seq}, {args.steps} steps, {args.rounds} rounds; "
          f"load average before {load0[0]:.2f}, after {load1[0]:.2f}")
    print(f"{'procs':>5} {'model':<7} {'layout':<15} {'tok/s (median, min-max)':<28} "
          f"{'vs 1 proc':>9} {'param+optim bytes/rank':>23} {'expert params/rank':>19}")
    for key, vals in tok.items():
        n, label, shard, ep = key
        med = statistics.median(vals)
        base = statistics.median(tok[(1, label, "none", 1)])
        r = last[key]
        parts = (["fsdp"] if shard == "fsdp" else []) + ([f"ep{ep}"] if ep > 1 else [])
        layout = "+".join(parts) or "replicated"
        if n > ep and ep > 1:
            layout += f" x dp{n // ep}"
        print(f"{n:>5} {label:<7} {layout:<15} {med:>9,.0f} ({min(vals):,.0f}-{max(vals):,.0f})"
              f"{'':<6} {med / base:>9.2f} {r['param_bytes'] + r['optim_bytes']:>23,} "
              f"{r['expert_elems']:>19,}")
    for n in (2, 4):
        dp, ep = (statistics.median(tok[(n, "routed", "none", e)]) for e in (1, 2))
        print(f"all-to-all overhead at {n} processes (routed model, EP 2 step time over data "
              f"parallel's): {dp / ep:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(ROOT))
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
