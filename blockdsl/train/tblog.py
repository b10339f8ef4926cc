"""Optional TensorBoard event files beside metrics.jsonl: the same rows, as scalars.

metrics.jsonl stays the record (strict JSON, one object a line, what `train`, `search`
and the tests read); the event files are for people who already read TensorBoard. One
rule maps a row to scalars, so nothing is logged to one and not the other: every finite
number of a row becomes the tag `<kind>/<field>` at the row's `step` (`train/loss`,
`train/lr`, `train/tokens_per_s`, `train/aux/balance`, `eval/val_loss`, `eval/val_bpb`,
...). Strings, nulls and the `step` itself are not scalars and are skipped; the final
`summary` row is logged too, at the last step.

`tensorboard` is an optional dependency (`pip install 'blockdsl[tensorboard]'`):
`torch.utils.tensorboard` only imports with it. `require()` says so in one line before a
run starts rather than after it has trained.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'blockdsl[tensorboard]' (or: pip install tensorboard)"


class TensorBoardMissing(Exception):
    """--tensorboard was asked for but the tensorboard package is not installed."""


def require() -> None:
    """Raise TensorBoardMissing (one line, with the install command) unless importable."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:  # torch raises ImportError when `tensorboard` is absent
        try:
            present = importlib.util.find_spec("tensorboard") is not None
        except ValueError:  # a module set to None in sys.modules: not importable either
            present = False
        state = f"cannot be imported ({e})" if present else "is not installed"
        raise TensorBoardMissing(
            f"--tensorboard needs the tensorboard package, which {state}; "
            f"install it with: {INSTALL_HINT}"
        ) from None


def scalars(record: dict[str, Any]) -> list[tuple[str, float]]:
    """The (tag, value) pairs a metrics row becomes: every finite number but `step`."""
    kind = record.get("kind")
    if not isinstance(kind, str):
        return []
    out = []
    for key, v in record.items():
        if key in ("kind", "step") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out.append((f"{kind}/{key}", float(v)))
    return out


class Writer:
    """Event files in `logdir`, fed the same rows as metrics.jsonl.

    `purge_step` (on a resumed run: the checkpoint's step + 1) makes TensorBoard hide the
    earlier attempt's events from that step on, as metrics.jsonl drops its rows after the
    checkpoint: both then show the resumed run once, not the lost tail and its redo.
    """

    def __init__(self, logdir: str | Path, purge_step: int | None = None) -> None:
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._w = SummaryWriter(log_dir=str(self.logdir), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        for tag, v in scalars(record):
            self._w.add_scalar(tag, v, global_step=step)
        # Rows come every log_every steps, not every step: flushing each one keeps the event
        # file as current as the line-buffered metrics.jsonl, so a kill -9 loses no more
        # of it (the writer would otherwise hold up to 10 events or 120 s).
        self._w.flush()

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()
