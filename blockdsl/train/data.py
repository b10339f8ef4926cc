"""Real, offline training data: byte-level text for language models, small images for classifiers.

Nothing here downloads. Text is tokenized at the byte level (vocab 256, no tokenizer to ship
or train) and cached as a memory-mapped uint8 array keyed by the content's hash, so a corpus
of any size costs no RAM and a second run starts at once. Images come from scikit-learn's
bundled 8x8 digits or from a user's folder in ImageFolder layout.

Every batch is a pure function of (seed, step): a resumed or sharded run sees exactly the
batches of an uninterrupted single-process run. Splits are fixed and documented:
text = the last 10% of the token stream is validation; digits = a fixed permutation
(seed 0), last 20% validation; image folders = per class, the last 10% of files (sorted
by name, at least one when the class has two or more) are validation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from blockdsl.files import atomic_write
from blockdsl.taskio import TaskIO, io_of, missing
from blockdsl.train import tokdata

# re-exported: callers and tests know these names as data.DataError, data.text_files, ...
from blockdsl.train.corpus import (
    VAL_FRACTION_TEXT,
    DataError,
    LMWindows,
    cache_dir,
    default_corpus_files,
    text_files,
)

VAL_FRACTION_DIGITS = 0.2
VAL_FRACTION_FOLDER = 0.1
BYTE_VOCAB = 256
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DEFAULT_CORPUS_NAME = "python-stdlib"


class TaskData(Protocol):
    """What the training loop needs from a data set, whatever the task."""

    task: str  # "lm" or "classify"
    name: str
    units_per_sample: int  # tokens per sequence (LM) or 1 (one image)

    def train_batch(self, step: int, batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
        """The global batch of optimizer step `step`: (inputs, targets), on CPU."""
        ...

    def val_batches(self, batch_size: int, max_batches: int | None) -> list[tuple[Tensor, Tensor]]:
        """Fixed validation batches, identical on every call and every rank."""
        ...


# ----------------------------------------------------------------------------- cache


def _fingerprint(files: list[Path]) -> str:
    """Cheap identity of a file list (paths, sizes, mtimes): skips re-hashing a known corpus."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _concat_hash(files: Iterable[Path]) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
    return h.hexdigest(), n


def load_tokens(files: list[Path], root: Path | None = None) -> np.ndarray:
    """Byte tokens of the files' concatenation, memory-mapped from the cache.

    The cache file is named by the content's sha256 (so an edited corpus never reuses stale
    tokens); a small index from (path, size, mtime) to hash saves re-hashing on later runs.
    If the cache cannot be written, the tokens are held in memory instead.
    """
    root = root or cache_dir()
    tok_dir = root / "tokens"
    index_path = tok_dir / "index.json"
    fp = _fingerprint(files)
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    digest = index.get(fp)
    if digest is not None:
        cached = tok_dir / f"{digest}.u8"
        if cached.is_file():
            return _memmap(cached)
    digest, n = _concat_hash(files)
    if n == 0:
        names = files[0] if len(files) == 1 else f"{len(files)} files"
        raise DataError(f"data is empty: {names}")
    cached = tok_dir / f"{digest}.u8"
    try:
        if not cached.is_file():
            tok_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=tok_dir, prefix=".tokens.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    for f in files:
                        out.write(f.read_bytes())
                os.replace(tmp, cached)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        index[fp] = digest
        atomic_write(index_path, json.dumps(index).encode())
    except OSError as e:
        warnings.warn(f"token cache {tok_dir} not writable ({e}); holding tokens in memory",
                      stacklevel=2)
        return np.frombuffer(b"".join(f.read_bytes() for f in files), dtype=np.uint8)
    return _memmap(cached)


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise DataError(f"data is empty: {path}")
    return np.memmap(path, dtype=np.uint8, mode="r")


@dataclass
class TextData(LMWindows):
    """A byte-token stream: train = first 90%, validation = last 10% (fixed, by position)."""

    tokens: np.ndarray
    seq_len: int
    name: str
    vocab_size: int = BYTE_VOCAB
    bytes_per_token: float | None = 1.0  # a token is a byte: val_loss / ln 2 is bits per byte
    task: str = "lm"
    val_fraction: float = VAL_FRACTION_TEXT
    split: int = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        self.split = n - math.ceil(n * self.val_fraction)
        need = self.seq_len + 1
        if self.split < need or n - self.split < need:
            raise DataError(
                f"{self.name}: {n} bytes is too little text for seq_len {self.seq_len} "
                f"(each of train and the last {self.val_fraction:.0%} needs {need} bytes)"
            )

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.split]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.split :]


def load_text(source: str | Path | None, seq_len: int, root: Path | None = None) -> TextData:
    """Text at `source` (file or folder), or the default corpus when `source` is None."""
    if source is None:
        files, name = default_corpus_files(), DEFAULT_CORPUS_NAME
    else:
        files, name = text_files(source), str(source)
    return TextData(load_tokens(files, root), seq_len=seq_len, name=name)


# ----------------------------------------------------------------------------- images


@dataclass
class ImageData:
    """Float images [N, C, H, W] in [-1, 1] with labels; the first `split` are training."""

    images: Tensor
    labels: Tensor
    split: int
    classes: list[str]
    name: str
    task: str = "classify"
    units_per_sample: int = 1

    def __post_init__(self) -> None:
        if self.split < 1 or self.split >= len(self.labels):
            raise DataError(
                f"{self.name}: {len(self.labels)} images cannot fill both a train and a "
                "validation split"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_batch(self, step: int, batch_size: int, seed: int) -> tuple[Tensor, Tensor]:
        """Epoch-wise shuffles seeded by (seed, epoch): sample k of the run is fixed."""
        n = self.split
        ks = np.arange(step * batch_size, (step + 1) * batch_size)
        idx = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(ks // n):
            perm = np.random.default_rng([seed, int(epoch)]).permutation(n)
            sel = ks // n == epoch
            idx[sel] = perm[ks[sel] % n]
        t = torch.from_numpy(idx)
        return self.images[t], self.labels[t]

    def val_batches(self, batch_size: int, max_batches: int | None) -> list[tuple[Tensor, Tensor]]:
        x, y = self.images[self.split :], self.labels[self.split :]
        out = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]
        return out if max_batches is None else out[:max_batches]


def _fit_images(x: Tensor, image_size: int, channels: int) -> Tensor:
    """uint8-range [N, c, h, w] to the model's [N, channels, S, S] in [-1, 1].

    Bilinear resize (not padding) so a digit fills a patch grid of any size; grey is
    repeated to RGB and RGB is averaged to grey.
    """
    x = x.float() / 255.0
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.mean(1, keepdim=True).expand(
            -1, channels, -1, -1
        )
    if x.shape[-2:] != (image_size, image_size):
        x = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False,
            antialias=image_size < x.shape[-1],
        )
    return (x * 2 - 1).contiguous()


def load_digits(image_size: int, channels: int) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), resized to the model."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise DataError(
            "the digits data set needs scikit-learn: pip install 'blockdsl[vision]'"
        ) from None
    if image_size < 8:
        raise DataError(f"model image size {image_size} is smaller than the 8x8 digits")
    d = sk_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    x = torch.from_numpy(d.images[perm] * (255.0 / 16.0)).unsqueeze(1)
    y = torch.from_numpy(d.target[perm].astype(np.int64))
    split = len(y) - math.ceil(len(y) * VAL_FRACTION_DIGITS)
    classes = [str(i) for i in range(10)]
    return ImageData(_fit_images(x, image_size, channels), y, split, classes, "sklearn-digits")


def _read_image(path: Path, image_size: int, channels: int) -> Tensor:
    """One image as [1, C, S, S] in [-1, 1]; Pillow is always there (matplotlib needs it)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
    except Exception as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)
    return _fit_images(t, image_size, channels)


def load_image_folder(path: str | Path, image_size: int, channels: int) -> ImageData:
    """ImageFolder layout (`root/<class>/<image>`); classes sorted by folder name.

    Images of any size are resized to the model's; per class the last 10% of files by name
    (at least one if the class has two) are validation, so adding a class never reshuffles.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path not found: {root}")
    if not root.is_dir():
        raise DataError(f"image data must be a folder of class subfolders: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"no class subfolders in {root} (expected {root}/<class>/<image>)")
    train: list[tuple[Path, int]] = []
    val: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        files = sorted(f for f in (root / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        n_val = max(1, round(len(files) * VAL_FRACTION_FOLDER)) if len(files) >= 2 else 0
        train += [(f, label) for f in files[: len(files) - n_val]]
        val += [(f, label) for f in files[len(files) - n_val :]]
    if not train or not val:
        raise DataError(f"too few images in {root}: need at least two in some class")
    items = train + val
    x = torch.cat([_read_image(f, image_size, channels) for f, _ in items])
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    return ImageData(x, y, len(train), classes, str(root))


# ----------------------------------------------------------------------------- model


def load_for_model(model: torch.nn.Module | TaskIO, source: str | Path | None = None,
                   seq_len: int | None = None, dtype: str | None = None) -> TaskData:
    """The data set a model trains on, checked against the model's vocabulary or image shape.

    `model` is a model with an `io` (`BlockModel.io`), or that `TaskIO` itself (the CLI
    checks token data against a Plan before any model is built).

    `source=None` picks the default: the stdlib corpus for language models, digits for
    classifiers. `seq_len` overrides the model's training context (it may only be shorter).
    A `.bin` file or a folder with `train.bin` is token ids (`blockdsl.train.tokdata`); `dtype`
    (uint16/uint32) reads one that has no JSON sidecar.
    """
    io = io_of(model)
    task = io.task
    lack = missing(io, *{"lm": ("vocab", "seq"),
                         "classify": ("image_size", "channels", "classes")}.get(task, ()))
    if lack is not None:
        raise DataError(f"the {task} model's task shape has no {lack}: build it with "
                        "blockdsl.build, or give it io=TaskIO(...)")
    if task == "lm":
        vocab = int(io.vocab)
        model_len = int(io.seq)
        t = model_len if seq_len is None else int(seq_len)
        if t < 1 or t > model_len:
            raise DataError(f"seq_len {t} must be between 1 and the model's seq_len {model_len}")
        if tokdata.is_token_source(source):
            return tokdata.load_token_data(source, t, vocab, dtype)
        if dtype is not None:
            raise DataError(f"a data dtype ({dtype}) applies to .bin token files only, and "
                            f"{source or 'the default corpus'} is text")
        if vocab < BYTE_VOCAB:
            raise DataError(
                f"model vocab_size {vocab} is smaller than the 256 byte tokens of text data"
            )
        if source is not None and Path(source).expanduser().is_dir() and _is_image_folder(
            Path(source).expanduser()
        ):
            raise DataError(f"{source} holds images, but the model is a language model")
        return load_text(source, t)
    if dtype is not None:
        raise DataError(f"a data dtype ({dtype}) applies to a language model's .bin tokens only")
    if task == "classify":
        size, ch, ncls = int(io.image_size), int(io.channels), int(io.classes)
        if ch not in (1, 3):
            raise DataError(f"model channels {ch}: images can be fitted to 1 or 3 channels only")
        data = load_digits(size, ch) if source is None else load_image_folder(source, size, ch)
        if data.num_classes > ncls:
            raise DataError(
                f"data {data.name} has {data.num_classes} classes but the model only {ncls}"
            )
        return data
    raise DataError(f"model task {task!r} is not one of 'lm', 'classify'")


def _is_image_folder(p: Path) -> bool:
    return any(
        f.suffix.lower() in IMAGE_SUFFIXES for d in p.iterdir() if d.is_dir() for f in d.iterdir()
    )

