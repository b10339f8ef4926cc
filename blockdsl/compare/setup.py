"""What a comparison is: its entrants (models from .block files), the one training
configuration they all share, the seeds, and the output folder that makes it resumable.

Why the entrants are saved as rendered specs (`<out>/specs/<label>.block`): every run,
in this process or in a worker process, trains that copy, so an edit to the original
file halfway through a comparison cannot make its seeds train different models, and the
results folder holds exactly what was compared. `compare.json` records the entrants'
rendered text and every training setting; rerunning the same command on the same
`--out` resumes, a different one is refused rather than mixed in. The seed count and
the worker count are not part of that identity: raising `--seeds` adds runs to a
finished comparison, and the worker count only changes how they are scheduled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockdsl import files as fileio
from blockdsl.graph import report
from blockdsl.lang.errors import BlockError
from blockdsl.lang.parse import load_module
from blockdsl.lang.render import render
from blockdsl.lang.resolve import resolve

SETUP_FILE = "compare.json"
BUDGETS = ("steps", "tokens", "seconds")


class CompareError(Exception):
    """A mistake the user can fix (arguments, output folder); printed as one line."""

    @property
    def cli_message(self) -> str:
        return str(self)


@dataclass
class CompareConfig:
    """The settings every run of a comparison shares (besides its seed), and how to run them.

    Exactly one budget is set; `seconds` counts training time only (as `train` does) and,
    unlike steps and tokens, is not reproducible from the seeds. `threads` (torch's
    intra-op threads per run; None: the cores over the workers) matters for exact
    reproduction: the same seeds give the same numbers on the same thread count.
    """

    steps: int | None = None
    tokens: int | None = None
    seconds: float | None = None
    seeds: int = 3
    first_seed: int = 0
    workers: int = 1
    threads: int | None = None
    data: str | None = None
    batch_size: int = 16
    seq_len: int | None = None
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.1
    precision: str = "bf16"
    eval_every: int = 50
    eval_batches: int | None = 16
    device: str = "cpu"
    timing_steps: int = 6
    tolerance: float = 0.05
    compile: bool | None = None  # train with a compiled step (train --compile); None: device default
    out: Path = field(default_factory=lambda: Path("runs/compare"))

    def budget(self) -> tuple[str, float]:
        set_ = [(k, getattr(self, k)) for k in BUDGETS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise CompareError("give exactly one budget: --steps, --tokens or --seconds")
        return set_[0]

    def run_threads(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // max(1, self.workers))

    def identity(self) -> dict[str, Any]:
        """The settings that change a run's numbers (what `compare.json` pins)."""
        d = asdict(self)
        for k in ("seeds", "workers", "threads", "out", "timing_steps", "tolerance"):
            d.pop(k)
        if d["compile"] is None:  # the default: comparisons written before the flag resume
            d.pop("compile")
        return d


@dataclass
class Entrant:
    """One compared model: its label (run folder name), where it came from, its rendered
    spec, and the accounting the report computes from the Plan."""

    label: str
    file: str
    model: str
    text: str
    stored_params: int
    active_params: int
    flops_per_token: float
    task: str

    def digest(self) -> str:
        body = "\n".join(ln for ln in self.text.splitlines() if not ln.startswith("#"))
        return hashlib.sha256(body.encode()).hexdigest()[:16]


def entrants(files: list[str | Path], models: list[str] | None = None) -> list[Entrant]:
    """Every model each file defines itself (not its includes; not search spaces), or, with
    `models`, only those named, in the order given. Raises CompareError or BlockError."""
    found: list[tuple[str, str, Any]] = []
    for f in files:
        if not Path(f).is_file():
            raise CompareError(f"no such spec file: {f}")
        module = load_module(Path(f))
        for name in module.own_models:
            m = module.model(name)
            if m is not None and not m.is_space:
                found.append((str(f), name, module))
    if models:
        picked = []
        for name in models:
            hit = [x for x in found if x[1] == name]
            if not hit:
                have = ", ".join(sorted({x[1] for x in found})) or "none"
                raise CompareError(f"--model {name}: no such model in the given files "
                                   f"(they define: {have})")
            picked.append(hit[0])
        found = picked
    if len(found) < 2:
        raise CompareError(f"a comparison needs at least two models; the files give "
                           f"{len(found)} ({', '.join(x[1] for x in found) or 'none'}): "
                           "name more files, or pick models with --model")
    out, seen = [], set()
    for f, name, module in found:
        label = name if sum(x[1] == name for x in found) == 1 else f"{Path(f).stem}.{name}"
        label = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        if label in seen:
            raise CompareError(f"model {name} of {f} is named twice; give each model once")
        seen.add(label)
        plan = resolve(module, name)
        if plan.choices:
            raise BlockError(f"model {name} has search choices; compare trains fixed models",
                             plan.span, "pick the found model (a search's best.block)")
        rep = report(plan)
        out.append(Entrant(label, f, name, render(plan), int(rep.stored_params),
                           int(rep.active_params_per_token), float(rep.flops_per_token),
                           plan.task))
    tasks = {e.task for e in out}
    if len(tasks) > 1:
        raise CompareError("the models do not share a task (" + ", ".join(
            f"{e.label}: {e.task}" for e in out) + "): they cannot train on the same data")
    return out


def open_out(cfg: CompareConfig, ents: list[Entrant]) -> bool:
    """Create `cfg.out` with compare.json and the rendered specs, or check that it holds
    this same comparison. True when it already did (a resume)."""
    out = Path(cfg.out)
    setup = {"identity": cfg.identity(),
             "entrants": [{"label": e.label, "file": e.file, "model": e.model,
                           "digest": e.digest()} for e in ents]}
    path = out / SETUP_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise CompareError(f"{path} is damaged (not JSON); choose another --out") from None
        if old != setup:
            what = _first_difference(old, setup)
            raise CompareError(f"{out} holds a different comparison ({what}); rerun its own "
                               "command to resume it, or choose another --out")
        return True
    if out.exists() and any(out.iterdir()):
        raise CompareError(f"{out} exists and is not a comparison folder; choose another --out")
    try:
        for e in ents:
            fileio.atomic_write(out / "specs" / f"{e.label}.block", e.text.encode())
        fileio.atomic_write(path, (json.dumps(setup, indent=1) + "\n").encode())
    except OSError as err:
        raise CompareError(f"cannot write to {out}: {err.strerror or err}") from None
    return False


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    oi, ni = old.get("identity", {}), new["identity"]
    for k in sorted(set(oi) | set(ni)):
        if oi.get(k) != ni.get(k):
            return f"{k} was {oi.get(k)!r}, now {ni.get(k)!r}"
    o = [(x.get("label"), x.get("digest")) for x in old.get("entrants", [])]
    n = [(x["label"], x["digest"]) for x in new["entrants"]]
    if [x[0] for x in o] != [x[0] for x in n]:
        return f"models were {[x[0] for x in o]}, now {[x[0] for x in n]}"
    changed = [a[0] for a, b in zip(o, n) if a != b]
    return f"the spec of {', '.join(changed)} changed"
