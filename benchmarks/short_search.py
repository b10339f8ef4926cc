"""Is a short search (`--budget 20`, `--budget 10`) useful, and which start design makes it so?

Runs the default space with each start design over several seeds and prints, per design,
what a user sees after 10 and 20 trials: feasible blocks trained (the baseline not
counted), how many beat the baseline, and the best validation loss against the
baseline's. Designs:

- `random10`: Optuna's 10 random start-up trials, then TPE (the old default);
- `random4`: 4 random start-up trials, then TPE;
- `neighbourhood`: up to 10 one-change neighbours of the baseline, then TPE (the new default).

    .venv/bin/python benchmarks/short_search.py --seconds 1.5          # 3 seeds, 20 trials
    .venv/bin/python benchmarks/short_search.py --seeds 0 1 --budget 10 --seconds 1

The first 10 trials of a 20-trial run are the same as a 10-trial run (the sampler and the
pruner see only earlier trials), so one run gives both columns. Training budgets are short
(`--seconds 1.5` at the space's pace: 40 baseline steps) to keep the whole comparison to
about 20 minutes; the study journals stay in benchmarks/out/. Results: docs/search.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from blockdsl import search as S

DESIGNS = {"random10": {"start": "random", "startup_trials": 10},
           "random4": {"start": "random", "startup_trials": 4},
           "neighbourhood": {"start": "neighbourhood", "startup_trials": 10}}


def at(study, k: int) -> tuple[int, int, float | None]:
    """(feasible trained blocks, how many beat the baseline, best value) in the first k counted
    trials after the baseline."""
    trials = sorted(S.counted_trials(study.get_trials(deepcopy=False)), key=lambda t: t.number)
    base = S.baseline_trial(study)
    bv = base.values[0] if base is not None else None
    rest = [t for t in trials if t.user_attrs.get("role") != "baseline"][:k]
    ok = [t for t in rest if t.user_attrs.get("status") in ("trained", "pruned")
          and all(v <= 0 for v in t.constraints.values())]
    vals = [t.values[0] for t in ok if t.values and t.state.name == "COMPLETE"]
    wins = sum(1 for v in vals if bv is not None and v < bv)
    return len(ok), wins, min(vals) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default=str(S.default_space_path()))
    ap.add_argument("--budget", type=int, default=20, help="trials after the baseline")
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--precision", default="fp32",
                    help="fp32 (default here): what the search defaulted to when the table in "
                    "docs/search.md was measured")
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args(argv)

    S.quiet_optuna()
    space = S.load_space(args.space)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ks = sorted({min(10, args.budget), args.budget})
    rows: dict[str, list] = {d: [] for d in args.designs}
    for seed in args.seeds:
        for d in args.designs:
            t0 = time.time()
            name = f"short-{d}-s{seed}-{stamp}"
            study = S.search(space, study=name, root=Path(args.out), seed=seed,
                             seconds=args.seconds, trials=args.budget + 1, threads=1,
                             precision=args.precision,
                             **DESIGNS[d])
            base = S.baseline_trial(study)
            r = [at(study, k) for k in ks]
            rows[d].append((base.values[0] if base else None, r))
            print(f"seed {seed} {d:<13} baseline {base.values[0]:.4f}  " + "  ".join(
                f"@{k}: {n} feasible, {w} beat, best {'-' if b is None else f'{b:.4f}'}"
                for k, (n, w, b) in zip(ks, r)) + f"  ({time.time() - t0:.0f}s)",
                file=sys.stderr, flush=True)
    print(f"\nspace {space.name}, {args.budget} trials after the baseline, {args.seconds:g}s "
          f"training each, seeds {' '.join(map(str, args.seeds))}")
    head = "design".ljust(14) + "".join(
        f"{'feasible@' + str(k):>12}{'beat@' + str(k):>9}{'best-base@' + str(k):>14}" for k in ks)
    print(head + "   (means over seeds; best-base: best val loss minus the baseline's, "
          "'-' when none trained)")
    for d, runs in rows.items():
        cells = ""
        for i, _k in enumerate(ks):
            n = statistics.mean(r[1][i][0] for r in runs)
            w = statistics.mean(r[1][i][1] for r in runs)
            diffs = [r[1][i][2] - r[0] for r in runs if r[1][i][2] is not None and r[0] is not None]
            dd = "-" if not diffs else f"{statistics.mean(diffs):+.4f}" + (
                f" ({len(diffs)}/{len(runs)})" if len(diffs) < len(runs) else "")
            cells += f"{n:>12.1f}{w:>9.1f}{dd:>14}"
        print(d.ljust(14) + cells)
    print("command: .venv/bin/python benchmarks/short_search.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
