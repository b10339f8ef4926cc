"""Run several training cases in one torchrun launch (the distributed tests' worker).

Usage (under torchrun): python tests/dist_cases.py CASES.json RESULT.json
CASES.json is a list of {"spec", "steps", "out", and optionally "shard", "ep", "resume",
"batch", "data", "precision", "accum"}; every rank trains each case in turn through
`blockdsl.train.spec.train_spec` (the path `blockdsl train` runs), and rank 0 writes one
result per case: the per-step losses, the final val loss, and the parameter elements this
rank holds (all, and of experts).
One launch runs many cases because starting processes and importing torch costs more
than the tiny runs themselves.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _bytes_per_rank(model: torch.nn.Module) -> dict[str, int]:
    """Parameter elements this rank stores (a DTensor counts its local shard), experts apart."""
    from torch.distributed.tensor import DTensor

    total = expert = 0
    for m in model.modules():
        names = {"w1", "b1", "w2", "b2", "keys", "values", "v", "o"} if getattr(m, "ep", None) else set()
        for n, p in m.named_parameters(recurse=False):
            k = (p.to_local() if isinstance(p, DTensor) else p).numel()
            total += k
            if n in names:
                expert += k
    return {"param_elems": total, "expert_elems": expert}


def make_config(c: dict) -> object:
    """The TrainConfig of one case; the single-process references use it too."""
    from blockdsl.train.config import TrainConfig

    return TrainConfig(steps=c["steps"], batch_size=c.get("batch", 8), seq_len=32, lr=3e-3,
                       warmup=2, min_lr_ratio=1.0, precision=c.get("precision", "fp32"),
                       accum=c.get("accum", 1), eval_every=10,
                       eval_batches=2, log_every=5, seed=0, out=c["out"], device="cpu",
                       quiet=True, resume=c.get("resume", False), shard=c.get("shard", "none"),
                       ep=c.get("ep", 1), data=c.get("data"))


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")  # Dist.setup then joins it and leaves it open
    from blockdsl.train import spec as spec_mod
    results = []
    for c in cases:
        seen: dict[str, object] = {}
        orig = spec_mod.train

        def spy(model, cfg, **kw):  # noqa: ANN001, ANN202 - records what this rank holds
            r = orig(model, cfg, **kw)
            seen.update(_bytes_per_rank(model))
            return r

        spec_mod.train = spy
        cfg = make_config(c)
        try:
            run = spec_mod.train_spec(c["spec"], None, cfg, default_steps=c["steps"])
            res = {"losses": run.result.losses, "val": run.result.val.get("val_loss"),
                   "steps": run.result.steps, **seen}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            import traceback

            res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        finally:
            spec_mod.train = orig
        results.append(res)
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
