"""Does the default sampler beat random search on the shipped space and data?

Runs the same search twice — the default sampler (TPE for one objective, NSGA-II for
several) and Optuna's RandomSampler — with the same budget, training settings and seed,
one after the other in this process, and prints the best feasible value of each, their
ratio and how the best value evolved over the budget.

    .venv/bin/python benchmarks/search_vs_random.py                      # default space, 200 trials each
    .venv/bin/python benchmarks/search_vs_random.py --budget 60 --seconds 4
    .venv/bin/python benchmarks/search_vs_random.py --reuse brainformer-20261122-004411
        # take the default-sampler side from a finished study (studies/<name>.journal)

A script, not a test: with the defaults it takes about as long as two `blockdsl search`
runs. Studies are kept in benchmarks/out/ so they can be inspected (`blockdsl search show`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from blockdsl import search as S


def best_curve(study, checkpoints: list[int]) -> list[float]:
    """Best feasible first-objective value among the first k counted trials, per k."""
    sign = 1.0 if study.directions[0].name == "MINIMIZE" else -1.0
    trials = sorted(S.counted_trials(study.get_trials(deepcopy=False)), key=lambda t: t.number)
    out = []
    for k in checkpoints:
        vals = [sign * t.values[0] for t in trials[:k]
                if t.values and t.state.name == "COMPLETE" and t.user_attrs.get("role") != "baseline"
                and all(v <= 0 for v in t.constraints.values())]
        out.append(sign * min(vals) if vals else math.nan)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default=str(S.default_space_path()))
    ap.add_argument("--budget", type=int, default=None, help="trials per search (default: the space's)")
    ap.add_argument("--seconds", type=float, default=None, help="training seconds per trial")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out", help="folder for the two journals")
    ap.add_argument("--reuse", help="a finished default-sampler study in studies/ to compare with")
    args = ap.parse_args(argv)

    S.quiet_optuna()
    space = S.load_space(args.space)
    settings = {"trials": args.budget, "seconds": args.seconds, "seed": args.seed, "threads": 1}
    cfg = S.make_config(space, **settings)
    root = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for label, sampler in (("default", "auto"), ("random", "random")):
        t0 = time.time()
        if label == "default" and args.reuse:
            study, info = S.load_study_info(args.reuse)
            cfg_used = info.get("config") or {}
            if cfg_used.get("trials") != cfg.trials or cfg_used.get("seconds") != cfg.seconds:
                print(f"warning: {args.reuse} ran {cfg_used.get('trials')} trials of "
                      f"{cfg_used.get('seconds')}s, this comparison {cfg.trials} of {cfg.seconds}s",
                      file=sys.stderr)
        else:
            if label == "random" and cfg.clock == "paired" and not cfg.pace:
                # The same step budgets as the first search: the baseline pace it measured.
                first = results["default"][0].user_attrs
                settings["pace"] = first.get("baseline_step_min") or first.get("baseline_step_cpu")
            name = f"bench-{label}-{stamp}"
            print(f"running {label} sampler: {cfg.trials} trials, {cfg.seconds:g}s each -> "
                  f"{root / (name + '.journal')}", file=sys.stderr, flush=True)
            study = S.search(space, study=name, root=root, sampler=sampler,
                             **{k: v for k, v in settings.items() if v is not None})
        results[label] = (study, None if label == "default" and args.reuse else time.time() - t0)

    checkpoints = sorted({max(1, cfg.trials // 4), max(1, cfg.trials // 2), cfg.trials})
    sampler_name = "NSGA-II" if space.multi else "TPE"
    metric = space.objectives[0][0]
    print(f"\nspace {space.name} ({args.space}), {cfg.trials} trials x {cfg.seconds:g}s, "
          f"objective {metric} ({space.objectives[0][1]}), seed {args.seed}")
    print(f"{'sampler':<10} " + " ".join(f"{'best@' + str(k):>10}" for k in checkpoints)
          + f" {'trained':>8} {'wall':>8}   (best feasible {metric} among the first k trials;"
          " '-' = none feasible yet)")
    for label, (study, wall) in results.items():
        curve = best_curve(study, checkpoints)
        s = S.summarize(study)
        name = sampler_name if label == "default" else "random"
        took = f"{wall / 60:>7.1f}m" if wall is not None else f"{'reused':>8}"
        print(f"{name:<10} " + " ".join(f"{v:>10.4f}" if not math.isnan(v) else f"{'-':>10}"
                                        for v in curve)
              + f" {s['trained']:>8} {took}")
    d = best_curve(results["default"][0], [cfg.trials])[0]
    r = best_curve(results["random"][0], [cfg.trials])[0]
    base = S.summarize(results["default"][0])["baseline"]
    if base:
        print(f"baseline   {base['values'][0]:.4f}")
    better = d < r if space.objectives[0][1] == "minimize" else d > r
    print(f"\n{sampler_name} best {d:.4f} vs random best {r:.4f}: ratio random/{sampler_name} = "
          f"{r / d:.4f} ({'default sampler better' if better else 'random better or equal'})")
    print("command: .venv/bin/python benchmarks/search_vs_random.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
