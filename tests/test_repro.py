"""Reproducibility of `blockdsl train`: two runs of the same spec, seed and thread count
(fresh processes) write the same metrics bit for bit, apart from the clock; another seed
does not. What the numbers do depend on beyond that is measured in docs/train.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_GPT = ROOT / "specs" / "tiny" / "gpt.block"
# fields measured with the clock: they differ between any two runs
TIMED = {"tokens_per_s", "train_seconds", "wall_seconds", "flops_per_s", "peak_flops_per_s", "mfu"}


def run(tmp_path: Path, name: str, seed: int, threads: int) -> list[dict]:
    out = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(
        [sys.executable, "-m", "blockdsl.cli", "train", str(TINY_GPT), "--steps", "10",
         "--batch-size", "4", "--eval-every", "5", "--eval-batches", "2", "--seed", str(seed),
         "--quiet", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMED} for r in rows]


@pytest.mark.parametrize("threads", [1, 2])
def test_same_seed_and_threads_give_identical_metrics(tmp_path: Path, threads: int) -> None:
    a = run(tmp_path, "a", 0, threads)
    b = run(tmp_path, "b", 0, threads)
    assert [r["kind"] for r in a].count("eval") == 3 and a[-1]["kind"] == "summary"
    assert a == b  # every loss, lr, grad norm and validation number, bit for bit
    # the summary says what else the numbers depend on (docs/train.md)
    env = a[-1]["env"]
    assert env["threads"] == threads and env["torch"] == torch.__version__
    assert env["python"] == platform.python_version() and env["device"] == "cpu"
    assert env["kernels"] == ["MultiHeadAttention.impl=bmm"]  # bf16 on CPU at seq 128
    assert env["cpu_capability"] and env["data"] and env["data_units"] > 100_000
    if (ROOT / ".git").exists():  # a checkout: the commit, since the version string stays put
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        assert env["git"].removesuffix("-dirty") == head
    if threads == 1:  # the seed is what the numbers are a function of: another one differs
        c = run(tmp_path, "c", 1, threads)
        assert [r.get("loss") for r in c if r["kind"] == "train"] != \
               [r.get("loss") for r in a if r["kind"] == "train"]
        assert c[0]["val_loss"] != a[0]["val_loss"]  # different initial weights
