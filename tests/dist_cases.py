"""Run several training cases in one torchrun launch (the distributed tests' worker).

Usage (under torchrun): python tests/dist_cases.py CASES.json RESULT.json
CASES.json is a list of {"spec", "steps", "out", and optionally "shard", "ep", "resume",
"batch", "data", "precision", "accum", "copy"}; "copy": a run folder rank 0 copies to
"out" first (to resume a checkpoint an earlier case of the same launch wrote); every rank
trains each case in turn through `blockdsl.train.spec.train_spec` (the path `blockdsl train`
runs), and rank 0 writes one result per case: the per-step losses, the final val loss, the
parameter elements this rank holds (all, and of experts) and its experts' AdamW moments,
and under "ranks" the same counts of every rank.
One launch runs many cases because starting processes and importing torch costs more
than the tiny runs themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _bytes_per_rank(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter elements this rank stores (a DTensor counts its local shard), experts apart,
    and the elements of the experts' AdamW moments (exp_avg, exp_avg_sq) it stores."""
    from torch.distributed.tensor import DTensor

    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    total = expert = state = 0
    for m in model.modules():
        names = {"w1", "b1", "w2", "b2", "keys", "values", "v", "o"} if getattr(m, "ep", None) else set()
        for n, p in m.named_parameters(recurse=False):
            k = local(p).numel()
            total += k
            if n in names:
                expert += k
                state += sum(local(v).numel() for v in opt.state.get(p, {}).values()
                             if torch.is_tensor(v) and v.ndim > 0)
    return {"param_elems": total, "expert_elems": expert, "expert_state_elems": state}


def make_config(c: dict) -> object:
    """The TrainConfig of one case; the single-process references use it too."""
    from blockdsl.train.config import TrainConfig

    return TrainConfig(steps=c["steps"], batch_size=c.get("batch", 8), seq_len=32, lr=3e-3,
                       warmup=2, min_lr_ratio=1.0, precision=c.get("precision", "fp32"),
                       accum=c.get("accum", 1), eval_every=10,
                       eval_batches=2, log_every=5, seed=0, out=c["out"], device="cpu",
                       quiet=True, resume=c.get("resume", False), shard=c.get("shard", "none"),
                       ep=c.get("ep", 1), data=c.get("data"))


def check_mixture(impl: str, lopsided: bool) -> float:
    """`ExpertParallel.mixture` against `expert_mixture` on the whole problem: outputs and
    the gradients of rows, gates and expert weights, max abs difference over all ranks.

    Every rank draws the same global problem (seeded), keeps its rows and the assignments
    of its rows, and its block of experts. Some assignments are dropped (id E). `lopsided`:
    every assignment goes to rank 0's experts and only rank 0 has any, so the other ranks
    send and receive nothing and must still take part in both exchanges.
    """
    from blockdsl.nn.dispatch import expert_mixture
    from blockdsl.nn.expert_parallel import ExpertParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(7)
    n, d, f, e, m = 6 * world, 8, 12, 2 * world, 40
    x = torch.randn(n, d, generator=g)
    w1, b1 = torch.randn(e, d, f, generator=g) / 3, torch.randn(e, f, generator=g)
    w2, b2 = torch.randn(e, f, d, generator=g) / 3, torch.randn(e, d, generator=g)
    src = torch.randint(0, n // world if lopsided else n, (m,), generator=g)
    expert = torch.randint(0, e // world if lopsided else e, (m,), generator=g)
    expert[::7] = e  # dropped
    gate = torch.rand(m, generator=g)
    probe = torch.randn(n, d, generator=g)
    full = [t.clone().requires_grad_() for t in (x, gate, w1, b1, w2, b2)]
    out = expert_mixture(full[0], src, expert, full[1], *full[2:], activation="gelu",
                         impl=impl, skipped=True)
    (out * probe).sum().backward()
    per, lo = n // world, rank * (n // world)
    mine = (src >= lo) & (src < lo + per)
    elo, ehi = rank * (e // world), (rank + 1) * (e // world)
    part = [x[lo: lo + per], gate[mine]] + [t[elo:ehi] for t in (w1, b1, w2, b2)]
    part = [t.clone().requires_grad_() for t in part]
    ep = ExpertParallel(dist.group.WORLD, rank, world, dist.group.WORLD, rank, world)
    got = ep.mixture(part[0], src[mine] - lo, expert[mine], part[1], *part[2:],
                     activation="gelu", impl=impl, skipped=True)
    (got * probe[lo: lo + per]).sum().backward()
    want = [out[lo: lo + per], full[0].grad[lo: lo + per], full[1].grad[mine]]
    want += [t.grad[elo:ehi] for t in full[2:]]
    have = [got, part[0].grad, part[1].grad] + [t.grad for t in part[2:]]
    # an expert no row reached has no gradient here; the reference's is zero
    have = [torch.zeros_like(w) if h is None else h for h, w in zip(have, want, strict=True)]
    err = torch.tensor([max(float((h - w).detach().abs().max()) if w.numel() else 0.0
                            for h, w in zip(have, want, strict=True))])
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return float(err[0])


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")  # Dist.setup then joins it and leaves it open
    from blockdsl.train import loop as loop_mod
    from blockdsl.train import spec as spec_mod
    results = []
    for c in cases:
        if "mixture" in c:
            results.append({"err": check_mixture(c["mixture"], c.get("lopsided", False))})
            continue
        if "copy" in c:
            if dist.get_rank() == 0:
                shutil.copytree(c["copy"], c["out"])
            dist.barrier()
        seen: dict[str, object] = {}
        orig, make = spec_mod.train, loop_mod.make_adamw

        def spy_opt(*a, **k):  # noqa: ANN002, ANN003, ANN202
            seen["opt"] = make(*a, **k)
            return seen["opt"]

        def spy(model, cfg, **kw):  # noqa: ANN001, ANN202 - records what this rank holds
            r = orig(model, cfg, **kw)
            seen.update(_bytes_per_rank(model, seen.pop("opt")))
            return r

        spec_mod.train, loop_mod.make_adamw = spy, spy_opt
        cfg = make_config(c)
        try:
            run = spec_mod.train_spec(c["spec"], None, cfg, default_steps=c["steps"])
            ranks: list = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, seen)  # what every rank holds
            res = {"losses": run.result.losses, "val": run.result.val.get("val_loss"),
                   "steps": run.result.steps, **seen, "ranks": ranks}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            import traceback

            res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        finally:
            spec_mod.train, loop_mod.make_adamw = orig, make
        results.append(res)
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
