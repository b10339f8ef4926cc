"""Step time and throughput of each entrant, measured paired against the first entrant.

The search's `paired_step_times` (its steps interleaved with the reference's in one
process, so load on a shared machine cancels out of the ratio) is reused as is: every
entrant after the first is timed against the first, on one batch of the comparison's
data at its batch size, precision and thread count. The first entrant's own time is the
median of its times over those pairings. Measured once, before training, and kept in
`<out>/timing.json`, so a resumed comparison reports the same step times.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from blockdsl import files as fileio
from blockdsl.compare.setup import CompareConfig, Entrant
from blockdsl.search.timing import paired_step_times

TIMING = "timing.json"


def measure(cfg: CompareConfig, ents: list[Entrant]) -> dict[str, Any]:
    """{label: {step_seconds, step_cpu_seconds, ratio, tokens_per_s}} plus how it was
    measured (threads, load average); read back from timing.json when present."""
    path = Path(cfg.out) / TIMING
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass  # damaged: measure again
    import torch

    from blockdsl.lang.parse import load_module
    from blockdsl.lang.resolve import resolve
    from blockdsl.lower import build_from_plan
    from blockdsl.train.data import load_for_model
    from blockdsl.train.device import resolve_device, seed_everything

    torch.set_num_threads(cfg.run_threads())
    device = resolve_device(cfg.device)
    models = []
    for e in ents:
        seed_everything(cfg.first_seed)
        plan = resolve(load_module(Path(cfg.out) / "specs" / f"{e.label}.block"), None)
        models.append(build_from_plan(plan, device=device, precision=cfg.precision,
                                      batch=cfg.batch_size))
    ds = load_for_model(models[0], cfg.data, cfg.seq_len)
    batch = ds.train_batch(0, cfg.batch_size, cfg.first_seed)
    units = cfg.batch_size * ds.units_per_sample
    load0 = os.getloadavg()
    times, ref_times = {}, []
    for e, m in zip(ents[1:], models[1:]):
        t = paired_step_times(m, models[0], batch, cfg.precision, steps=cfg.timing_steps)
        times[e.label] = (t.cand, t.cand_cpu, t.ratio)
        ref_times.append((t.ref, t.ref_cpu))
    ref = statistics.median(r[0] for r in ref_times)
    times[ents[0].label] = (ref, statistics.median(r[1] for r in ref_times), 1.0)
    out: dict[str, Any] = {
        "entrants": {label: {"step_seconds": w, "step_cpu_seconds": c,
                             "ratio_to_first": ratio, "tokens_per_s": units / w}
                     for label, (w, c, ratio) in times.items()},
        "reference": ents[0].label, "timed_steps": cfg.timing_steps,
        "threads": cfg.run_threads(), "device": str(device), "batch_units": units,
        "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg()),
    }
    fileio.atomic_write(path, (json.dumps(out, indent=1) + "\n").encode())
    return out
