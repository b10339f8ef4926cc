"""Token data beyond bytes: pre-tokenized `.bin` corpora, and tokenizing text into them.

A corpus is a flat file of token ids (uint16 or uint32, native little-endian), the layout
nanoGPT made common: a folder with `train.bin` and `val.bin`, or one `.bin` whose last 10%
is validation (the byte corpus's rule). The ids are memory-mapped, so a corpus of any size
costs no RAM. The dtype and vocabulary come from a JSON sidecar (`meta.json` in the folder,
or `<name>.json` beside a single file) or from `--data-dtype`; nanoGPT's `meta.pkl` is a
pickle, which can run code when loaded, so it is never read.

`blockdsl tokenize` writes that layout from text files with a Hugging Face `tokenizers`
tokenizer.json, or with a byte-level BPE it trains offline on the training part of the
text. Its `meta.json` records the bytes per validation token, so bits per byte stay
comparable with byte-level runs.

Batches follow the byte corpus's rule exactly (random windows of the train part from a
generator seeded by `(seed, step)`; consecutive windows from the start of validation), so
a run is a pure function of the seed and the step here too, resumed or sharded.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blockdsl.files import atomic_write
from blockdsl.train.corpus import VAL_FRACTION_TEXT, DataError, LMWindows, cache_dir, text_files

DTYPES: dict[str, Any] = {"uint16": np.uint16, "uint32": np.uint32}
META = "meta.json"
FORMAT = "blockdsl-tokens/1"
MAX_META_BYTES = 1 << 20  # a sidecar is a few lines; never read a huge file into memory
SCAN_CHUNK = 1 << 24  # ids per step of the max-id scan (32-64 MiB of memory at most)
PIECE_CHARS = 1 << 20  # text handed to the tokenizer at once, cut after a newline
MAX_TOKENIZER_BYTES = 1 << 28  # a 256k-token tokenizer.json is ~30 MB; refuse a wrong file
MAX_TRAIN_VOCAB = 1 << 21  # far past real vocabularies; bounds the BPE trainer's tables


class VocabMismatch(DataError):
    """The spec's vocabulary does not fit the data's; the CLI locates it at the model."""

    def __init__(self, message: str, hint: str):
        super().__init__(f"{message} ({hint})")
        self.message, self.hint = message, hint


# ----------------------------------------------------------------------------- reading


def is_token_source(source: str | Path | None) -> bool:
    """A `.bin` file, or a folder holding `train.bin`: read as token ids, not as text."""
    if source is None:
        return False
    p = Path(source).expanduser()
    return (p.is_dir() and (p / "train.bin").is_file()) or (
        p.suffix == ".bin" and not p.is_dir()
    )


@dataclass
class Meta:
    """What a sidecar says; every field may be missing (then a flag or the scan decides)."""

    path: Path | None = None
    dtype: str | None = None
    vocab_size: int | None = None
    bytes_per_token: float | None = None


def read_meta(path: Path) -> Meta:
    """A JSON sidecar, checked field by field (it is user data: any of it may be wrong)."""
    try:
        if path.stat().st_size > MAX_META_BYTES:
            raise DataError(f"{path}: {path.stat().st_size} bytes is too large for a sidecar")
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object like "
                        '{"dtype": "uint16", "vocab_size": 4096}')
    meta = Meta(path=path)
    dtype = obj.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise DataError(f"{path}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        meta.dtype = dtype
    vocab = obj.get("vocab_size")
    if vocab is not None:
        if isinstance(vocab, bool) or not isinstance(vocab, int) or not 1 <= vocab <= 2**32:
            raise DataError(f"{path}: vocab_size must be a positive integer, got {vocab!r}")
        meta.vocab_size = vocab
    bpt = obj.get("bytes_per_token")
    if bpt is not None:
        if isinstance(bpt, bool) or not isinstance(bpt, int | float) or not (
            math.isfinite(bpt) and bpt > 0
        ):
            raise DataError(f"{path}: bytes_per_token must be a positive number, got {bpt!r}")
        meta.bytes_per_token = float(bpt)
    return meta


def _layout(source: Path) -> tuple[Path, Path | None, Path]:
    """(train file, val file or None for a split of train, where a sidecar would be)."""
    if source.is_dir():
        val = source / "val.bin"
        return source / "train.bin", (val if val.is_file() else None), source / META
    if not source.exists():
        raise DataError(f"data path not found: {source}")
    side = source.with_suffix(".json")
    return source, None, (side if side.is_file() else source.parent / META)


def resolve_meta(source: Path, dtype: str | None) -> tuple[Meta, str]:
    """The sidecar (if any) and the dtype to read with; a flag and a sidecar must agree."""
    _, _, side = _layout(source)
    meta = read_meta(side) if side.is_file() else Meta()
    if dtype is not None and dtype not in DTYPES:
        raise DataError(f"data dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype is not None and meta.dtype is not None and dtype != meta.dtype:
        raise DataError(f"--data-dtype {dtype} contradicts {meta.path} (dtype {meta.dtype})")
    chosen = dtype or meta.dtype
    if chosen is None:
        pkl = side.parent / "meta.pkl"
        why = (f"{pkl} is a pickle, which blockdsl never loads (unpickling runs code)"
               if pkl.exists() else f"no {side.name} beside it")
        raise DataError(
            f"{source}: the token dtype is unknown ({why}); pass --data-dtype uint16|uint32 "
            f'(nanoGPT writes uint16) or write {side} as {{"dtype": "uint16", "vocab_size": N}}'
        )
    return meta, chosen


def open_tokens(path: Path, dtype: str) -> np.ndarray:
    """The ids of one file, memory-mapped; an empty or ragged file is refused by name."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    width = np.dtype(DTYPES[dtype]).itemsize
    if size == 0:
        raise DataError(f"token file is empty: {path}")
    if size % width:
        raise DataError(
            f"{path} is {size} bytes, not a whole number of {dtype} ids ({width} bytes each): "
            "a wrong dtype, or a truncated file"
        )
    try:
        return np.memmap(path, dtype=DTYPES[dtype], mode="r")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot map {path}: {e}") from None


def max_token_id(tokens: np.ndarray, path: Path, root: Path | None = None) -> int:
    """The largest id in a token file: one chunked scan, then cached by (path, size, mtime).

    Why a scan: an id past the spec's vocabulary would index out of the embedding (a crash
    mid-run on CPU, a device assert on CUDA); checking it once up front costs one read of
    the file, and the cache makes every later run of the same file free.
    """
    st = path.stat()
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{tokens.dtype}"
    index_path = (root or cache_dir()) / "tokens" / "maxid.json"
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    hit = index.get(key)
    if isinstance(hit, int) and not isinstance(hit, bool):
        return hit
    top = 0
    for i in range(0, len(tokens), SCAN_CHUNK):
        top = max(top, int(tokens[i : i + SCAN_CHUNK].max()))
    index[key] = top
    try:
        atomic_write(index_path, json.dumps(index).encode())
    except OSError:
        pass  # an unwritable cache only costs the scan again next time
    return top


@dataclass
class TokenData(LMWindows):
    """Token ids with a train and a validation part (views of memory-mapped files)."""

    train: np.ndarray
    val: np.ndarray
    seq_len: int
    name: str
    vocab_size: int
    bytes_per_token: float | None = None  # None: bits per byte cannot be reported
    task: str = "lm"
    split: int = field(init=False)

    def __post_init__(self) -> None:
        self.split = len(self.train)
        need = self.seq_len + 1
        for part, arr in (("train", self.train), ("validation", self.val)):
            if len(arr) < need:
                raise DataError(
                    f"{self.name}: its {part} part has {len(arr)} tokens, too few for one "
                    f"sequence of seq_len {self.seq_len} (needs {need})"
                )


def check_vocab(source: str | Path, spec_vocab: int, dtype: str | None = None) -> Meta:
    """Refuse a spec whose vocabulary differs from the sidecar's, cheaply (no scan).

    Why equality and not `>=`: a larger embedding than the tokenizer's trains rows no id
    ever selects and moves the loss's baseline, and in practice it means the spec was
    written for another tokenizer (the MoEUT specs' 8000 SentencePiece ids).
    """
    meta, _ = resolve_meta(Path(source).expanduser(), dtype)
    if meta.vocab_size is not None and meta.vocab_size != spec_vocab:
        raise VocabMismatch(
            f"spec vocab {spec_vocab}, data vocab {meta.vocab_size}: the model's embedding "
            f"and output must have one row per token id of {source}",
            f"set stem tokens(vocab={meta.vocab_size}) in the spec, or tokenize the text "
            f"again with `blockdsl tokenize ... --train-bpe {spec_vocab}`",
        )
    return meta


def load_token_data(source: str | Path, seq_len: int, spec_vocab: int,
                    dtype: str | None = None) -> TokenData:
    """A token corpus for a language model of vocabulary `spec_vocab`, fully checked."""
    src = Path(source).expanduser()
    train_path, val_path, _ = _layout(src)
    meta = check_vocab(src, spec_vocab, dtype)
    _, chosen = resolve_meta(src, dtype)
    if not train_path.is_file():
        raise DataError(f"{train_path} not found")
    train = open_tokens(train_path, chosen)
    parts = [(train_path, train)]
    if val_path is not None:
        val = open_tokens(val_path, chosen)
        parts.append((val_path, val))
    else:  # one file: the last 10% is validation, as for byte text
        n = len(train)
        split = n - math.ceil(n * VAL_FRACTION_TEXT)
        train, val = train[:split], train[split:]
    for path, arr in parts:
        top = max_token_id(arr, path)
        if meta.vocab_size is not None and top >= meta.vocab_size:
            raise DataError(f"token id {top} in {path} is >= the vocab_size {meta.vocab_size} of "
                            f"{meta.path}: the sidecar does not describe this file")
        if top >= spec_vocab:
            raise VocabMismatch(
                f"token id {top} in {path} is >= spec vocab {spec_vocab}",
                "the spec's stem tokens(vocab=...) must exceed every id: use the "
                "tokenizer's vocabulary size",
            )
    return TokenData(train, val, seq_len, str(source), meta.vocab_size or spec_vocab,
                     meta.bytes_per_token)


# ----------------------------------------------------------------------------- writing


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise DataError("tokenizing needs the Hugging Face tokenizers library: "
                        "pip install 'blockdsl[tokenizers]'") from None
    return tokenizers


def _blocks(files: list[Path], lo: int, hi: int) -> Iterator[bytes]:
    """Bytes [lo, hi) of the files' concatenation, 1 MiB at a time."""
    pos = 0
    for f in files:
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                a, b = pos, pos + len(block)
                pos = b
                if b <= lo:
                    continue
                if a >= hi:
                    return
                yield block[max(0, lo - a) : hi - a]


def text_pieces(files: list[Path], lo: int, hi: int) -> Iterator[str]:
    """The text of bytes [lo, hi), in pieces of about 1 MiB that end after a newline.

    Why pieces: memory stays bounded whatever the corpus's size, and a cut after a newline
    falls between pre-tokenizer words, so the ids are those of the whole text at once up to
    how a run of whitespace spanning a cut is grouped.
    Invalid UTF-8 becomes U+FFFD (the files were already checked to look like text).
    """
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    buf = ""
    for block in _blocks(files, lo, hi):
        buf += dec.decode(block)
        cut = buf.rfind("\n") + 1
        if len(buf) < PIECE_CHARS or (cut == 0 and len(buf) < 4 * PIECE_CHARS):
            continue
        cut = cut or len(buf)  # one very long line: cut it rather than grow without bound
        yield buf[:cut]
        buf = buf[cut:]
    buf += dec.decode(b"", final=True)
    if buf:
        yield buf


def _split_point(files: list[Path], total: int) -> int:
    """Byte offset where validation starts: the last 10%, moved to just after a newline."""
    at = total - math.ceil(total * VAL_FRACTION_TEXT)
    pos = at
    for block in _blocks(files, at, total):
        nl = block.find(b"\n")
        if nl >= 0:
            return pos + nl + 1 if pos + nl + 1 < total else at
        pos += len(block)
    return at


def train_bpe(files: list[Path], lo: int, hi: int, vocab: int) -> Any:
    """A byte-level BPE (GPT-2's pre-tokenizer, all 256 bytes in the alphabet) on [lo, hi).

    Byte-level, so any text, in any script or encoding accident, tokenizes without an
    unknown token; trained on the training part only, so validation stays unseen.
    """
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[], show_progress=False,
    )
    tok.train_from_iterator(text_pieces(files, lo, hi), trainer=trainer)
    return tok


def _write_ids(tok: Any, files: list[Path], lo: int, hi: int, path: Path, dtype: Any,
               limit: int) -> tuple[int, int]:
    """Tokenize bytes [lo, hi) into `path`; returns (tokens written, largest id)."""
    n, top = 0, 0
    with path.open("xb") as out:  # plain open: the file gets the user's umask
        for piece in text_pieces(files, lo, hi):
            ids = np.asarray(tok.encode(piece, add_special_tokens=False).ids, dtype=np.int64)
            if ids.size:
                top = max(top, int(ids.max()))
                if top >= limit:
                    raise DataError(f"the tokenizer produced id {top}, past its own vocabulary "
                                    f"of {limit}")
                ids.astype(dtype).tofile(out)
                n += int(ids.size)
        out.flush()
        os.fsync(out.fileno())
    return n, top


def tokenize(inputs: list[str | Path], out: Path, *, tokenizer: str | Path | None = None,
             bpe_vocab: int | None = None, force: bool = False) -> dict[str, Any]:
    """Write `out/train.bin`, `out/val.bin`, `out/meta.json` (+ `tokenizer.json`).

    The text is every input file, or every text file under an input folder (sorted, as for
    `train --data`), concatenated as is; the last 10% of its bytes, moved forward to a line
    start, is validation. `meta.json` is written last and removed first, so a folder with
    one always holds a complete, matching corpus.
    """
    if (tokenizer is None) == (bpe_vocab is None):
        raise DataError("give exactly one of --tokenizer FILE and --train-bpe VOCAB")
    if bpe_vocab is not None and not 256 <= bpe_vocab <= MAX_TRAIN_VOCAB:
        raise DataError(f"--train-bpe {bpe_vocab}: a byte-level BPE needs a vocabulary from "
                        f"256 (the bytes) to {MAX_TRAIN_VOCAB}")
    tk = _tokenizers()
    out = Path(out).expanduser()
    dest = out.resolve()
    files: list[Path] = []
    for src in inputs:
        for f in text_files(src):
            # never the output folder's own files (a folder input may contain it)
            if f not in files and dest not in f.resolve().parents:
                files.append(f)
    if not files:
        raise DataError(f"no text to tokenize outside the output folder {out}")
    total = sum(f.stat().st_size for f in files)
    split = _split_point(files, total)
    if split <= 0 or split >= total:
        raise DataError(f"{total} bytes of text is too little to split into train and "
                        "validation")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    taken = [n for n in ("train.bin", "val.bin", META, "tokenizer.json") if (out / n).exists()]
    if taken and not force:
        raise DataError(f"{out} already holds {', '.join(taken)}; choose another --out or "
                        "pass --force to replace them")

    if tokenizer is not None:
        tpath = Path(tokenizer).expanduser()
        if tpath.is_file() and tpath.stat().st_size > MAX_TOKENIZER_BYTES:
            raise DataError(f"{tpath}: {tpath.stat().st_size:,} bytes is too large for a "
                            "tokenizer.json (real ones are a few MB)")
        try:
            tok = tk.Tokenizer.from_file(str(tpath))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions
            raise DataError(f"{tpath}: not a tokenizers tokenizer.json "
                            f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
                            ) from None
        vocab = int(tok.get_vocab_size(with_added_tokens=True))
    else:
        tok = train_bpe(files, 0, split, bpe_vocab)
        # The vocabulary asked for, not the trained size: a small text may yield fewer
        # merges, and the ids still fit the embedding the user's spec declares.
        vocab = int(bpe_vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    tmp = {n: out / f".{n}.{os.getpid()}.tmp" for n in ("train.bin", "val.bin", "tokenizer.json")}
    try:
        n_train, _ = _write_ids(tok, files, 0, split, tmp["train.bin"], DTYPES[dtype], vocab)
        n_val, _ = _write_ids(tok, files, split, total, tmp["val.bin"], DTYPES[dtype], vocab)
        if n_train == 0 or n_val == 0:
            raise DataError("the tokenizer produced no ids for the train or validation text")
        if tokenizer is not None:
            shutil.copyfile(Path(tokenizer).expanduser(), tmp["tokenizer.json"])
        else:
            tok.save(str(tmp["tokenizer.json"]))
        for n, p in tmp.items():
            os.replace(p, out / n)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    meta = {
        "format": FORMAT,
        "dtype": dtype,
        "vocab_size": vocab,
        "tokenizer_vocab_size": int(tok.get_vocab_size(with_added_tokens=True)),
        "bytes_per_token": (total - split) / n_val,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "train_bytes": split,
        "val_bytes": total - split,
        "files": len(files),
        "tokenizer": "tokenizer.json",
        "trained_bpe": bpe_vocab is not None,
    }
    _write_public(out / META, (json.dumps(meta, indent=1) + "\n").encode())
    return meta


def _write_public(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, created by plain `open` so that it gets the
    user's umask like the .bin files beside it (mkstemp would make it owner-only)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
