"""Front-end latency: `blockdsl check` cold, per spec, against the 0.3 s target.

    .venv/bin/python benchmarks/frontend.py [--reps 10] [--all]

Cold is what a user waits for: a fresh `blockdsl check SPEC` process through the console
script, interpreter start and imports included (the work itself is a few ms); the best
of --reps runs, the specs interleaved so that all of them see the same machine load.
Warm is the same parse + resolve + report in this process (what the search pays per
trial). The reference in the same run is a bare interpreter start, so the ratio column
says how many interpreter starts a check costs on this machine right now. Last, where a
cold check's imports go (`python -X importtime`, self time summed per top-level package).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.3  # seconds, cold, per spec


def check_cmd(spec: Path) -> list[str]:
    """`blockdsl check SPEC` as a user runs it: the venv's console script."""
    script = Path(sys.executable).with_name("blockdsl")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "blockdsl.cli"]
    return [*head, "check", str(spec)]


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def import_breakdown(spec: Path) -> list[tuple[str, float]]:
    """Self import time (ms) per top-level package, stdlib lumped, for one cold check."""
    cmd = check_cmd(spec)
    cmd = [sys.executable, "-X", "importtime", *(cmd[1:] if cmd[0] == sys.executable else cmd)]
    err = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stderr
    per: dict[str, float] = defaultdict(float)
    # `import time: <self us> | <cumulative us> | <indented module name>`
    for m in re.finditer(r"^import time:\s+(\d+) \|\s+\d+ \| +(\S+)$", err, re.M):
        top = m.group(2).split(".")[0]
        per["(stdlib)" if top in sys.stdlib_module_names else top] += int(m.group(1)) / 1000
    return sorted(per.items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--all", action="store_true",
                    help="every spec under specs/ (default: the seed specs, specs/*.block)")
    args = ap.parse_args()
    import blockdsl

    pattern = "**/*.block" if args.all else "*.block"
    specs = sorted(p.relative_to(ROOT) for p in (ROOT / "specs").glob(pattern))
    bare_cmd = [sys.executable, "-c", "pass"]
    cold: dict[Path, list[float]] = {s: [] for s in specs}
    bare = []
    for _ in range(args.reps):  # interleaved: drifting load hits every spec alike
        bare.append(run(bare_cmd))
        for spec in specs:
            cold[spec].append(run(check_cmd(spec)))
    b = min(bare)
    print(f"# {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}; best of {args.reps}")
    pyc = "not written (PYTHONDONTWRITEBYTECODE): blockdsl compiles its modules on every run"
    print(f"# bytecode: {pyc if sys.flags.dont_write_bytecode else 'cached'}")
    print(f"# reference: bare interpreter start {b * 1000:.0f} ms")
    print(f"{'spec':40s} {'check (cold)':>13s} {'x bare':>7s} {'< 0.3 s':>8s} {'warm':>9s}")
    worst = 0.0
    for spec in specs:
        c = min(cold[spec])
        warm = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            blockdsl.report(ROOT / spec)
            warm.append(time.perf_counter() - t0)
        worst = max(worst, c)
        print(f"{str(spec):40s} {c * 1000:10.0f} ms {c / b:7.1f} {'yes' if c < TARGET else 'NO':>8s} "
              f"{statistics.median(warm) * 1000:6.1f} ms")
    print(f"# worst cold check: {worst * 1000:.0f} ms ({worst / TARGET:.2f}x the {TARGET} s target)")
    parts = import_breakdown(specs[0])
    total = sum(ms for _, ms in parts)
    print(f"# imports of one cold check ({specs[0]}), self time per package, one run "
          f"(-X importtime inflates it): {total:.0f} ms")
    print("#   " + ", ".join(f"{name} {ms:.0f}" for name, ms in parts if ms >= 1))


if __name__ == "__main__":
    main()
