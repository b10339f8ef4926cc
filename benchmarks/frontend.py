"""Front-end latency: parse + resolve + parameter report for every spec in specs/.

    .venv/bin/python benchmarks/frontend.py [--reps 5]

Two figures per spec: `blockdsl check` as a fresh process (interpreter start included,
what a user waits for; target < 0.3 s) and the same work in a warm process (what the
search pays per trial). The reference in the same run is a bare `python -c pass`, so the
ratio column says how many interpreter starts a check costs on this machine right now.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cold(cmd: list[str], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    import blockdsl

    specs = sorted(p.relative_to(ROOT) for p in (ROOT / "specs").rglob("*.block"))
    bare = cold([sys.executable, "-c", "pass"], args.reps)
    print(f"# {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}; best of {args.reps}")
    print(f"# reference: bare interpreter start {bare * 1000:.0f} ms")
    print(f"{'spec':40s} {'check (cold)':>13s} {'x bare':>7s} {'< 0.3 s':>8s} {'warm':>9s}")
    worst = 0.0
    for spec in specs:
        c = cold([sys.executable, "-m", "blockdsl.cli", "check", str(spec)], args.reps)
        warm = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            blockdsl.report(ROOT / spec)
            warm.append(time.perf_counter() - t0)
        worst = max(worst, c)
        print(f"{str(spec):40s} {c * 1000:10.0f} ms {c / bare:7.1f} {'yes' if c < 0.3 else 'NO':>8s} "
              f"{statistics.median(warm) * 1000:6.1f} ms")
    print(f"# worst cold check: {worst * 1000:.0f} ms ({worst / 0.3:.2f}x the 0.3 s target)")


if __name__ == "__main__":
    main()
