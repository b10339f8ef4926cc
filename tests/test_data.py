"""Data loading: real text and images, fixed splits, batches fixed by (seed, step)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blockdsl.taskio import TaskIO
from blockdsl.train import data
from blockdsl.train.data import DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKDSL_CACHE", str(tmp_path / "cache"))


def lm(vocab: int = 256, seq_len: int = 16) -> TaskIO:
    return TaskIO("lm", seq=seq_len, vocab=vocab)


def clf(size: int = 8, channels: int = 1, classes: int = 10) -> TaskIO:
    return TaskIO("classify", image_size=size, channels=channels, classes=classes)


def test_folder_is_sorted_text_files_only(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bravo ")
    (root / "a.md").write_text("alpha ")
    (root / "sub" / "c.txt").write_text("charlie ")
    (root / "img.bin").write_bytes(b"\x89PNG\0\0binary")
    (root / ".hidden").write_text("secret")
    files = data.text_files(root)
    assert [f.name for f in files] == ["a.md", "b.txt", "c.txt"]
    tokens = data.load_tokens(files)
    assert bytes(tokens) == b"alpha bravo charlie "
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint8


def test_cache_is_keyed_by_content(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("one " * 100)
    first = data.load_tokens([f])
    again = data.load_tokens([f])
    assert again.filename == first.filename  # index hit: same cached file
    f.write_text("two " * 100)
    changed = data.load_tokens([f])
    assert changed.filename != first.filename and bytes(changed[:4]) == b"two "
    cached = sorted((tmp_path / "cache" / "tokens").glob("*.u8"))
    assert len(cached) == 2 and not list((tmp_path / "cache" / "tokens").glob("*.tmp"))


def test_default_corpus_is_the_stdlib_split_at_90_percent() -> None:
    d = data.load_for_model(lm(seq_len=64))
    assert isinstance(d, data.TextData) and d.name == data.DEFAULT_CORPUS_NAME
    n = len(d.tokens)
    assert n > 1_000_000 and d.split == n - int(np.ceil(n * 0.1))
    assert b"import" in bytes(d.tokens[:20000])


def test_text_batches_depend_only_on_seed_and_step() -> None:
    d = data.load_text(None, 32)
    x0, y0 = d.train_batch(7, 8, seed=1)
    x1, y1 = d.train_batch(7, 8, seed=1)
    assert torch.equal(x0, x1) and torch.equal(x0[:, 1:], y0[:, :-1])
    assert x0.shape == (8, 32) and x0.dtype == torch.int64
    assert not torch.equal(x0, d.train_batch(8, 8, seed=1)[0])
    assert not torch.equal(x0, d.train_batch(7, 8, seed=2)[0])
    val = d.val_batches(8, 3)
    assert len(val) == 3 and all(v[0].shape == (8, 32) for v in val)
    assert bytes(val[0][0][0].to(torch.uint8).numpy()) == bytes(d.tokens[d.split:d.split + 32])


def test_text_too_short_and_empty(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    with pytest.raises(DataError, match="too little text for seq_len 16"):
        data.load_for_model(lm(), short)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    with pytest.raises(DataError, match="data is empty"):
        data.load_for_model(lm(), empty)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "blob.dat").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="no text files in folder"):
        data.load_for_model(lm(), binary)


def test_model_mismatch_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="vocab_size 200 is smaller"):
        data.load_for_model(lm(vocab=200))
    with pytest.raises(DataError, match="task 'seg' is not one of"):
        data.load_for_model(TaskIO("seg"))
    folder = _image_folder(tmp_path)
    with pytest.raises(DataError, match="holds images, but the model is a language model"):
        data.load_for_model(lm(), folder)
    with pytest.raises(DataError, match="has 2 classes but the model only 1"):
        data.load_for_model(clf(classes=1), folder)
    with pytest.raises(DataError, match="channels 2"):
        data.load_for_model(clf(channels=2))


def test_digits_fit_the_model() -> None:
    d = data.load_for_model(clf(size=16, channels=3))
    assert isinstance(d, data.ImageData)
    assert d.images.shape == (1797, 3, 16, 16) and d.split == 1437
    assert -1.0 <= d.images.min() < d.images.max() <= 1.0
    assert set(d.labels[d.split:].tolist()) == set(range(10))
    x, y = d.train_batch(0, 32, seed=0)
    assert x.shape == (32, 3, 16, 16) and torch.equal(y, d.train_batch(0, 32, seed=0)[1])


def test_image_batches_cover_each_epoch_once() -> None:
    d = data.load_digits(8, 1)
    n = d.split
    seen = torch.cat([d.train_batch(s, 100, seed=3)[1] for s in range((n + 99) // 100)])
    assert torch.equal(torch.bincount(seen[:n]), torch.bincount(d.labels[:n]))


def test_digits_need_scikit_learn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"pip install 'blockdsl\[vision\]'"):
        data.load_digits(8, 1)


def _image_folder(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 10), ("dog", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            size = (12 + i, 9 + i)  # images of any size are resized to the model's
            arr = rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i:02d}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_split_and_shapes(tmp_path: Path) -> None:
    d = data.load_for_model(clf(size=8, channels=1, classes=2), _image_folder(tmp_path))
    assert isinstance(d, data.ImageData) and d.classes == ["cat", "dog"]
    assert d.images.shape == (13, 1, 8, 8) and d.split == 11
    assert d.labels[d.split:].tolist() == [0, 1]  # the last file of each class
    x, y = d.val_batches(4, None)[0]
    assert x.shape == (2, 1, 8, 8) and y.tolist() == [0, 1]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class subfolders"):
        data.load_image_folder(tmp_path, 8, 1)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.png").write_bytes(b"not really a png")
    with pytest.raises(DataError, match="too few images"):
        data.load_image_folder(tmp_path, 8, 1)
    (tmp_path / "only" / "y.png").write_bytes(b"not really a png")
    with pytest.raises(DataError, match="cannot read image"):
        data.load_image_folder(tmp_path, 8, 1)
    with pytest.raises(DataError, match="data path not found"):
        data.load_image_folder(tmp_path / "missing", 8, 1)
