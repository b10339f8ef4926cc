"""`blockdsl compare`: several models trained under one budget, data and set of
hyperparameters, several seeds each, reported side by side with their seed noise.

`compare(files, models, cfg)` is the whole experiment as a library call (the CLI parses
arguments and renders): resolve the entrants (`setup`), open or resume the output folder,
time the entrants paired (`timing`), train the runs still to train (`runner`), and write
results.json (`results`), loss.png and summary.png (`plots`). Above `search` in the
stages because it reuses the search's paired step timing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockdsl.compare.results import assemble, write
from blockdsl.compare.setup import CompareConfig, CompareError, Entrant, entrants, open_out
from blockdsl.compare.stats import Difference, Spread, difference, size_warnings, spread

__all__ = ["CompareConfig", "CompareError", "Compared", "Difference", "Entrant", "Spread",
           "compare", "difference", "entrants", "size_warnings", "spread"]

Say = Callable[[str], None]


@dataclass
class Compared:
    """What `compare` returns: the results.json content and where the files are."""

    results: dict[str, Any]
    results_path: Path
    loss_plot: Path
    summary_plot: Path
    resumed: bool
    kept: int  # runs found finished when this call started


def compare(files: list[str | Path], models: list[str] | None, cfg: CompareConfig,
            say: Say | None = None) -> Compared:
    """Run (or resume) the comparison into `cfg.out`; see the module docstring.

    `say` receives progress lines. Raises CompareError / BlockError for a mistake the user
    can fix, KeyboardInterrupt after Ctrl-C (every run stopped at a checkpoint)."""
    from blockdsl.compare import plots, runner, timing

    say = say or (lambda _text: None)
    cfg.budget()  # exactly one
    if cfg.seeds < 1 or cfg.workers < 1:
        raise CompareError("--seeds and --workers must be at least 1")
    ents = entrants(files, models)
    resumed = open_out(cfg, ents)
    done, todo = runner.pending(cfg, ents)
    if resumed:
        say(f"resuming {cfg.out}: {len(done)} finished run(s) kept, {len(todo)} to run")
    say("timing the models' steps, paired with " + ents[0].label)
    tm = timing.measure(cfg, ents)
    total, kept = len(done) + len(todo), len(done)

    def on_done(label: str, seed: int, r: dict[str, Any]) -> None:
        done[(label, seed)] = r
        say(f"[{len(done)}/{total}] {label} seed {seed}: val_loss "
            f"{r['val'].get('val_loss', float('nan')):.4f} after {r['steps']} steps")

    runner.run_all(cfg, todo, on_done)
    seeds = runner.seeds_of(cfg)
    res = assemble(cfg, ents, done, tm, seeds)
    path = write(cfg.out, res)
    kind, value = cfg.budget()
    title = " vs ".join(e.label for e in ents) + f" ({value:g} {kind}, {len(seeds)} seeds)"
    loss = plots.plot_curves(ents, done, Path(cfg.out) / "loss.png", title)
    summ = plots.plot_summary(res, Path(cfg.out) / "summary.png", title)
    return Compared(res, path, loss, summ, resumed, kept)


