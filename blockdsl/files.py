"""Writing result files safely: whole or not at all, with the modes the user's umask gives.

One module for the run folders (train), the study folders (search) and token corpora, so
that every file blockdsl writes behaves alike after a kill: a reader sees the old file or
the new one, never half of one. Torch-free.
"""

from __future__ import annotations

import contextlib
import os
import stat
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
    import tempfile  # here, not at the top: `blockdsl check` reads specs through this module

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


class NotARegularFile(OSError):
    """A path that names a device, pipe or socket (reading it could block or never end)."""


class TooLarge(OSError):
    """A file over the cap; `size` is its size, or at least what was read of it."""

    def __init__(self, size: int):
        super().__init__(f"more than the cap ({size:,} bytes or more)")
        self.size = size


def read_regular(path: Path, cap: int) -> bytes:
    """All of a regular file of at most `cap` bytes, and never more than cap + 1 read.

    The file is opened without blocking (a FIFO would otherwise wait for a writer forever)
    and checked with fstat on the open descriptor (no window between a check and the
    open), so a FIFO, a device like /dev/zero or a folder is refused before a byte is
    read. Raises FileNotFoundError, IsADirectoryError, NotARegularFile, TooLarge or
    another OSError.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "Is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(f"{path} is not a regular file")
        if st.st_size > cap:
            raise TooLarge(st.st_size)
        chunks, got = [], 0
        while got <= cap:  # the size may have changed since fstat
            chunk = os.read(fd, cap + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    if got > cap:
        raise TooLarge(got)
    return b"".join(chunks)
