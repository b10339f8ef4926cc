"""What `blockdsl compile` produces, as library functions: the artifacts and the smoke step.

The CLI parses flags and renders tables; the files it writes and the smoke run are here,
so a Python caller gets the same resolved.block, graph.svg and summary.json (and the same
smoke numbers) as the command, without going through argparse.

torch is imported inside `smoke` only: compiling a spec without `--smoke`/`--tune` writes
its artifacts without building anything, and must not pay torch's import.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from blockdsl.graph import Report, human_bytes, report, to_graph
from blockdsl.lang.errors import BlockError
from blockdsl.lang.render import render
from blockdsl.picture import to_svg
from blockdsl.plan import Plan

RESOLVED, SUMMARY, GRAPH = "resolved.block", "summary.json", "graph.svg"


def default_out(plan: Plan) -> Path:
    """out/<model>: where compile writes when no folder is given."""
    return Path("out") / plan.name


def write_artifacts(plan: Plan, out: Path, rep: Report | None = None) -> dict[str, Any]:
    """Write resolved.block and graph.svg into `out` (created) and return the summary dict.

    summary.json is not written here but by `write_summary`, once the caller has added what
    it measured (`tuning`, `smoke`): a run that fails on the way leaves no summary that
    claims to be complete.
    """
    rep = rep or report(plan)
    summary = rep.to_json()
    out.mkdir(parents=True, exist_ok=True)
    (out / RESOLVED).write_text(render(plan), encoding="utf-8")
    fam = {layer.index: layer.family for layer in plan.layers}
    (out / GRAPH).write_text(to_svg(rep, fam, plan=plan), encoding="utf-8")
    g = to_graph(plan)
    summary["graph"] = {"nodes": g.number_of_nodes(), "edges": g.number_of_edges()}
    return summary


def write_summary(summary: dict[str, Any], out: Path) -> None:
    """Record the artifacts' paths in `summary` and write it as out/summary.json."""
    summary["artifacts"] = {
        "resolved_spec": str(out / RESOLVED),
        "summary": str(out / SUMMARY),
        "graph": str(out / GRAPH),
    }
    (out / SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")


def smoke_shape(plan: Plan, batch: int | None, seq: int | None) -> tuple[int, int | None]:
    """The smoke step's (batch, seq): 2 and the model's context unless given. A seq outside
    the context is refused as `train --seq` refuses it (a located error): shortened silently,
    the step would time another shape than the one asked for."""
    if seq is not None and plan.seq is not None and not 1 <= seq <= plan.seq:
        raise BlockError(f"--seq {seq} is outside model {plan.name}'s context of {plan.seq}",
                         plan.span, f"use --seq between 1 and {plan.seq}")
    return batch or 2, seq or plan.seq


def smoke(plan: Plan, *, batch: int | None = None, seq: int | None = None,
          device: str = "auto", force: bool = False) -> dict[str, Any]:
    """Build the model and run one training step's forward and backward on random input.

    Refuses (a located BlockError) a step whose estimated memory exceeds the device's
    before anything is built, unless `force`; an out-of-memory error past that is one too.
    """
    import torch

    from blockdsl.train.device import resolve_device
    from blockdsl.train.memory import memory_guard

    b, seq = smoke_shape(plan, batch, seq)
    dev = resolve_device(device)
    # Before anything is built: a spec can describe terabytes (d_ff=2**28) or a 1B model
    # whose smoke step takes minutes and most of the machine; refuse it with the numbers.
    est = memory_guard(plan, batch=b, seq=seq, precision="fp32", optimizer=False, device=dev,
                       force=force, what="compile --smoke",
                       hint="use a smaller --batch or --seq, or pass --force to build it anyway")
    try:
        return _smoke_run(plan, b, seq, dev, est)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e):
            raise
        # only reachable past the guard (--force, or an estimate that fell short)
        raise BlockError(
            f"compile --smoke of model {plan.name} ran out of memory on {dev.type} "
            f"(estimated {human_bytes(est.total)}): {str(e).splitlines()[0][:160]}",
            plan.span, "use a smaller --batch or --seq",
        ) from None


def _smoke_run(plan: Plan, b: int, seq: int, dev: Any, est: Any) -> dict[str, Any]:
    """Two steps of `train.step.step` without an update (fp32, seed 0); the second is timed.

    The loss is the training loop's own (cross-entropy on float32 logits plus the aux
    terms), computed by the same function, so a finite smoke step says the trained step
    will start finite too.
    """
    import torch

    from blockdsl.lower import build_from_plan, random_batch
    from blockdsl.train.step import step

    torch.manual_seed(0)
    model = build_from_plan(plan, device=dev, precision="fp32")
    n_params = sum(p.numel() for p in model.parameters())
    x, y = random_batch(plan, b, dev, seq=seq)
    model.train()
    times = []
    finite = True
    for _ in range(2):  # the first step pays one-off allocation; report the second
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        out = step(model, x, y, precision="fp32", device=dev)
        times.append(time.perf_counter() - t0)
        total = out.loss + sum(out.aux.values(), torch.zeros((), device=dev))
        finite &= bool(torch.isfinite(total)) and all(
            bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None
        )
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    return {
        "device": str(dev),
        "batch": b,
        "input_shape": list(x.shape),
        "module_params": n_params,
        "step_seconds": times[-1],
        "loss": out.loss.item(),
        "aux": {k: v.item() for k, v in out.aux.items()},
        "finite": finite,
        "params_without_grad": no_grad,
        "memory_estimate": {"weights": est.weights, "grads": est.grads,
                            "activations": est.activations, "total": est.total},
    }
