"""What a run shows and hears while it trains: a progress bar, and Ctrl-C/SIGTERM as a stop request."""

from __future__ import annotations

import signal
import threading
from typing import Any


class Interrupt:
    """Ctrl-C or SIGTERM asks to stop after the current step and checkpoint; a second one aborts.

    SIGTERM too because that is what torchrun sends its workers on Ctrl-C, and what batch
    schedulers send before they kill a job. Handlers are restored when training ends.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._prev: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._prev[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)


class Progress:
    """A rich progress bar on stderr (loss, throughput, ETA), or nothing."""

    def __init__(self, enabled: bool, total: float | None, unit: str, step: str = "0") -> None:
        self.bar = None
        self.console = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("step {task.fields[step]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} " + unit + "/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.bar.add_task("train", total=total, step=step, loss="-", rate="-")
        self.bar.start()

    def update(self, completed: float, **fields: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, **fields)

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
