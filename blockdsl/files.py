"""Writing result files safely: whole or not at all, with the modes the user's umask gives.

One module for the run folders (train), the study folders (search) and token corpora, so
that every file blockdsl writes behaves alike after a kill: a reader sees the old file or
the new one, never half of one. Torch-free.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process's umask (Linux reports it in /proc; elsewhere set-and-restore)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes | Callable[[Any], None]) -> None:
    """Write `path` whole or not at all: a temporary file in the same folder, renamed over it.

    `data` is the bytes, or a function that writes to the open binary file. mkstemp
    creates the file 0600; it gets the mode a plain `open` would have given (0666 less the
    umask), so a run's metrics.jsonl is as readable as its loss.png.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
