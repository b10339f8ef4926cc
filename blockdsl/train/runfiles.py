"""A run folder's files besides checkpoints: metrics.jsonl (strict JSON), loss.png, TensorBoard."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

from blockdsl import files as fileio
from blockdsl.train.config import TrainError
from blockdsl.train.tblog import Writer


def _strict_json(record: dict[str, Any]) -> str:
    """One metrics line: strict JSON, a non-finite number written as null (not `NaN`,
    which Python's json emits by default and no other JSON reader accepts)."""
    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return json.dumps(fix(record), allow_nan=False)


class RunFiles:
    """The run folder (rank 0 only): metrics.jsonl, loss.png and checkpoints; and, when
    asked, TensorBoard event files in `tb_dir` fed the very rows metrics.jsonl gets."""

    def __init__(self, out: Path | None, resume_step: int | None,
                 tb_dir: Path | None = None) -> None:
        self.out = out
        self.tb = None
        if tb_dir is not None:
            try:
                self.tb = Writer(tb_dir, purge_step=None if resume_step is None else resume_step + 1)
            except OSError as e:
                raise TrainError(f"cannot write TensorBoard logs in {tb_dir}: "
                                 f"{e.strerror or e}") from None
        self.metrics_path = out / "metrics.jsonl" if out else None
        if self.metrics_path is None:
            self._fh = None
            return
        lines: list[str] = []
        if resume_step is not None and self.metrics_path.is_file():
            # keep the history up to the checkpoint; later lines belong to the lost tail.
            # The file is data, maybe damaged (a torn line, bytes that are not UTF-8, a row
            # whose step is no number): such lines are dropped, never a reason to crash.
            text = self.metrics_path.read_bytes().decode("utf-8", "replace")
            for line in text.splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    step = rec.get("step", 0) if isinstance(rec, dict) else None
                    if isinstance(step, (int, float)) and not isinstance(step, bool) \
                            and step <= resume_step:
                        lines.append(_strict_json(rec))  # an older file's bare NaN -> null
        fileio.atomic_write(
            self.metrics_path, "".join(line + "\n" for line in lines).encode()
        )
        self._fh = self.metrics_path.open("a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(_strict_json(record) + "\n")
        if self.tb is not None:
            self.tb.log(record)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def history(self) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        train: list[tuple[int, float]] = []
        val: list[tuple[int, float]] = []
        if self.metrics_path is None or not self.metrics_path.is_file():
            return train, val
        for line in self.metrics_path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "train":
                train.append((r["step"], r["loss"]))
            elif r.get("kind") == "eval":
                val.append((r["step"], r["val_loss"]))
        return train, val


def plot_losses(train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path,
                title: str) -> Path:
    """Loss curve PNG via the Agg canvas directly: no pyplot global state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", lw=1.5, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


def check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"cannot write to output folder {out}: {e.strerror or e}") from None
