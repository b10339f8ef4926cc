"""results.json: the comparison side by side, from the finished runs' result files."""

from __future__ import annotations

import json
from dataclasses import asdict
from itertools import combinations
from pathlib import Path
from typing import Any

from blockdsl import files as fileio
from blockdsl.compare.setup import CompareConfig, Entrant
from blockdsl.compare.stats import difference, size_warnings, spread

RESULTS = "results.json"
EXTRA_METRICS = ("val_bpb", "val_acc")  # reported with their spread when the data has them


def assemble(cfg: CompareConfig, ents: list[Entrant], done: dict[tuple[str, int], dict],
             timing: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """Every entrant's accounting, measured speed and final validation metrics over seeds;
    each pair's difference in validation loss (b minus a: negative means b is better);
    the size/compute warnings. Runs not finished are left out and counted."""
    kind, value = cfg.budget()
    rows = []
    per_seed: dict[str, dict[int, float]] = {}
    for e in ents:
        t = timing.get("entrants", {}).get(e.label, {})
        runs = {s: done[(e.label, s)] for s in seeds if (e.label, s) in done}
        per_seed[e.label] = {s: r["val"]["val_loss"] for s, r in runs.items()
                             if r["val"].get("val_loss") is not None}
        row: dict[str, Any] = {
            "label": e.label, "file": e.file, "model": e.model,
            "stored_params": e.stored_params, "active_params": e.active_params,
            "flops_per_token": e.flops_per_token,
            "step_seconds": t.get("step_seconds"), "tokens_per_s": t.get("tokens_per_s"),
            "step_ratio_to_first": t.get("ratio_to_first"),
            "runs": len(runs), "val_loss_per_seed": {str(s): v for s, v in per_seed[e.label].items()},
            "val_loss": spread(list(per_seed[e.label].values())).as_dict()
            if per_seed[e.label] else None,
            "steps": sorted({r["steps"] for r in runs.values()}),
            "train_seconds": spread([r["train_seconds"] for r in runs.values()]).as_dict()
            if runs else None,
        }
        for m in EXTRA_METRICS:
            vals = [r["val"][m] for r in runs.values() if r["val"].get(m) is not None]
            if vals:
                row[m] = spread(vals).as_dict()
        rows.append(row)
    diffs = [asdict(difference(a.label, b.label, per_seed[a.label], per_seed[b.label]))
             for a, b in combinations(ents, 2) if per_seed[a.label] and per_seed[b.label]]
    return {
        "budget": {"kind": kind, "value": value},
        "settings": {**cfg.identity(), "threads": cfg.run_threads(), "workers": cfg.workers},
        "seeds": seeds,
        "complete": all(len(per_seed[e.label]) == len(seeds) for e in ents),
        "metric": "val_loss (nats per token, or per image for a classifier; lower is better)",
        "noise_rule": "a difference is outside the seed noise when the seed ranges do not "
                      "overlap and it exceeds twice its standard error (needs >= 2 seeds)",
        "entrants": rows,
        "differences": diffs,
        "warnings": size_warnings(rows, cfg.tolerance),
        "timing": timing,
    }


def write(out: Path, results: dict[str, Any]) -> Path:
    path = Path(out) / RESULTS
    fileio.atomic_write(path, (json.dumps(results, indent=1) + "\n").encode())
    return path
