"""What byte text (`data`) and token-id corpora (`tokdata`) share: a module of its own.

`data.load_for_model` dispatches to `tokdata`, and `tokdata` draws batches the way byte
text does; with these pieces in `data`, the two modules imported each other. Here they
have one home that imports neither, so the dependency runs one way: data -> tokdata ->
corpus.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

VAL_FRACTION_TEXT = 0.1


class DataError(Exception):
    """A data problem the user can fix; the message is one line naming it."""


def cache_dir() -> Path:
    """`$BLOCKDSL_CACHE`, else `~/.cache/blockdsl`: tokens and measured machine rates."""
    env = os.environ.get("BLOCKDSL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blockdsl"


def default_corpus_files() -> list[Path]:
    """The running Python's top-level standard-library sources, sorted by name.

    Why: real text (~5 MB of code, comments and docstrings) present on every machine that
    runs blockdsl, with nothing to download or vendor. No package on the registry we can
    reach was found to ship English prose of that size (see docs/train.md).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if not files:
        raise DataError(f"default corpus: no .py files in the standard library at {stdlib}")
    return files


def _looks_like_text(path: Path) -> bool:
    """No NUL byte and valid UTF-8 in the first 8 KiB: skips images, archives, pyc."""
    try:
        with path.open("rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return len(head) == 8192 and e.start >= len(head) - 3  # a character cut at the edge
    return True


def text_files(path: str | Path) -> list[Path]:
    """A file, or every text file under a folder (recursive, hidden skipped, sorted)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    if p.is_file():
        return [p]
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(p).parts)
        and _looks_like_text(f)
    )
    if not files:
        raise DataError(f"no text files in folder {p}")
    return files


class LMWindows:
    """Batches of next-token windows from a `train` and a `val` array of token ids.

    Shared by byte text (`TextData`) and token-id corpora (`tokdata.TokenData`), so both
    draw batches the same way: a `.bin` holding a text's bytes gives the text's batches.
    Needs `train`, `val`, `split` (= len(train)) and `seq_len`.
    """

    train: np.ndarray
    val: np.ndarray
    split: int
    seq_len: int

    @property
    def units_per_sample(self) -> int:
        return self.seq_len

    @property
    def train_tokens(self) -> int:
        return self.split

    def _windows(self, arr: np.ndarray, starts: np.ndarray) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        w = torch.from_numpy(np.asarray(arr[idx], dtype=np.int64))
        return w[:, :-1], w[:, 1:]

    def train_batch(self, step: int, batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
        """Random windows of the train part; the generator is seeded by (seed, step)."""
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.split - self.seq_len, size=batch_size)
        return self._windows(self.train, starts)

    def val_batches(self, batch_size: int, max_batches: int | None) -> list[tuple[Tensor, Tensor]]:
        """Consecutive windows from the start of the validation part."""
        n_win = (len(self.val) - 1) // self.seq_len
        if max_batches is not None:
            n_win = min(n_win, max_batches * batch_size)
        starts = self.seq_len * np.arange(n_win)
        return [self._windows(self.val, starts[i : i + batch_size])
                for i in range(0, n_win, batch_size)]
