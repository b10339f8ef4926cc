"""Token data beyond bytes: `.bin` token ids (nanoGPT layout), `blockdsl tokenize` with a
real tokenizers BPE trained in the test, and `train --data DIR` reading those ids."""

from __future__ import annotations

import json
import math
import os
import stat
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from blockdsl.cli import main
from blockdsl.taskio import TaskIO
from blockdsl.train import data, tokdata
from blockdsl.train.data import DataError

# tokenizers is in the `test` extra (pyproject.toml), so CI always runs these; the skip is
# only for a bare install without it.
tokenizers = pytest.importorskip("tokenizers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXT = [STDLIB / "textwrap.py", STDLIB / "json" / "decoder.py", STDLIB / "json" / "encoder.py"]

SPEC = """\
model tok_tiny {{
  d = 32
  stem tokens(vocab={vocab}, context=32, pos=rope)
  head lm(tie=true)
  norm rmsnorm()
  block layer {{
    attn mha(heads=2, bias=false)                norm=pre
    ffn  mlp(d_ff=64, act=swiglu, bias=false)    norm=pre
  }}
  repeat 1 layer
}}
"""


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKDSL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One BPE (vocab 384) trained through the CLI on three stdlib files: shared, seconds."""
    out = tmp_path_factory.mktemp("tok") / "corpus"
    assert main(["tokenize", *map(str, TEXT), "--train-bpe", "384", "--out", str(out),
                 "--quiet"]) == 0
    return out


def spec(tmp_path: Path, vocab: int) -> Path:
    p = tmp_path / f"tok{vocab}.block"
    p.write_text(SPEC.format(vocab=vocab))
    return p


def lm(vocab: int, seq_len: int = 16) -> TaskIO:
    return TaskIO("lm", seq=seq_len, vocab=vocab)


# ----------------------------------------------------------------------------- tokenize


def test_tokenize_writes_a_lossless_corpus_with_meta(corpus: Path) -> None:
    meta = json.loads((corpus / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 384
    train = np.fromfile(corpus / "train.bin", dtype=np.uint16)
    val = np.fromfile(corpus / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert 0 < train.max() < 384 and val.max() < 384
    # the byte-level BPE is lossless: the ids decode to exactly the concatenated text
    whole = b"".join(f.read_bytes() for f in TEXT)
    tok = tokenizers.Tokenizer.from_file(str(corpus / "tokenizer.json"))
    text_train = tok.decode(train.tolist()).encode()
    text_val = tok.decode(val.tolist()).encode()
    assert text_train + text_val == whole
    # validation = the last 10% of the bytes, from a line start; ratio measured on it
    assert len(text_val) == meta["val_bytes"] and text_train.endswith(b"\n")
    assert abs(len(text_val) - math.ceil(len(whole) * 0.1)) < 200
    assert meta["bytes_per_token"] == pytest.approx(len(text_val) / len(val))
    assert 1.5 < meta["bytes_per_token"] < 4  # a BPE merged something


def test_tokenize_with_a_given_tokenizer_reproduces_the_ids(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    assert main(["tokenize", *map(str, TEXT), "--tokenizer", str(corpus / "tokenizer.json"),
                 "--out", str(out), "--quiet"]) == 0
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (corpus / name).read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 384 and meta["trained_bpe"] is False
    umask = os.umask(0)
    os.umask(umask)
    for name in ("train.bin", "meta.json", "tokenizer.json"):  # the user's umask, not 0600
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask


def test_tokenize_errors_are_one_line_exit_1(corpus: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # an existing corpus is never overwritten silently
    assert main(["tokenize", str(TEXT[0]), "--train-bpe", "300", "--out", str(corpus)]) == 1
    assert "already holds train.bin" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    assert main(["tokenize", str(TEXT[0]), "--tokenizer", str(bad), "--out", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not a tokenizers tokenizer.json") and "Traceback" not in err
    assert main(["tokenize", str(tmp_path / "nope.txt"), "--train-bpe", "300"]) == 1
    assert "data path not found" in capsys.readouterr().err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x")
    assert main(["tokenize", str(tiny), "--train-bpe", "300", "--out", "t"]) == 1
    assert "too little to split" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: below the 256 bytes
        main(["tokenize", str(TEXT[0]), "--train-bpe", "100"])
    assert e.value.code == 1
    assert "at least 256" in capsys.readouterr().err
    assert not Path("x").exists()  # nothing is created for a refused run


# ----------------------------------------------------------------------------- .bin reading


def test_token_batches_are_the_memmap_windows_of_seed_and_step(corpus: Path) -> None:
    d = data.load_for_model(lm(384, 16), corpus)
    assert isinstance(d, tokdata.TokenData) and d.vocab_size == 384
    assert isinstance(d.train, np.memmap)
    train = np.memmap(corpus / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(corpus / "val.bin", dtype=np.uint16, mode="r")
    for step in (0, 7):
        x, y = d.train_batch(step, 4, seed=3)
        starts = np.random.default_rng([3, step]).integers(0, len(train) - 16, size=4)
        want = np.stack([train[s : s + 17] for s in starts]).astype(np.int64)
        assert torch.equal(x, torch.from_numpy(want[:, :-1]))
        assert torch.equal(y, torch.from_numpy(want[:, 1:]))
    assert not torch.equal(d.train_batch(0, 4, 3)[0], d.train_batch(1, 4, 3)[0])
    (vx, vy), *_ = d.val_batches(2, 1)
    assert vx.tolist() == [val[0:16].tolist(), val[16:32].tolist()]
    assert vy[0].tolist() == val[1:17].tolist()


def test_a_single_bin_splits_like_byte_text(tmp_path: Path) -> None:
    """A .bin of the bytes of a text gives exactly the byte corpus's batches."""
    text = TEXT[0].read_bytes()
    (tmp_path / "t.txt").write_bytes(text)
    np.frombuffer(text, dtype=np.uint8).astype(np.uint16).tofile(tmp_path / "t.bin")
    as_text = data.load_for_model(lm(256, 16), tmp_path / "t.txt")
    as_ids = data.load_for_model(lm(256, 16), tmp_path / "t.bin", dtype="uint16")
    assert as_ids.split == as_text.split and as_ids.bytes_per_token is None
    for step in (0, 5):
        assert all(torch.equal(a, b) for a, b in zip(as_ids.train_batch(step, 3, 0),
                                                      as_text.train_batch(step, 3, 0)))
    a, b = as_ids.val_batches(4, 2), as_text.val_batches(4, 2)
    assert len(a) == len(b) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    # a sidecar <name>.json gives the dtype instead of the flag
    (tmp_path / "t.json").write_text('{"dtype": "uint16", "vocab_size": 256}')
    assert data.load_for_model(lm(256, 16), tmp_path / "t.bin").split == as_text.split


def test_bad_token_files_are_refused_by_name(tmp_path: Path) -> None:
    ragged = tmp_path / "r.bin"
    ragged.write_bytes(b"\x01\x00" * 100 + b"\x01")
    with pytest.raises(DataError, match=r"201 bytes, not a whole number of uint16 ids"):
        data.load_for_model(lm(256), ragged, dtype="uint16")
    (tmp_path / "e.bin").write_bytes(b"")
    with pytest.raises(DataError, match="token file is empty"):
        data.load_for_model(lm(256), tmp_path / "e.bin", dtype="uint32")
    big = tmp_path / "big.bin"
    ids = np.arange(1000, dtype=np.uint32) % 300
    ids[777] = 70000
    ids.tofile(big)
    with pytest.raises(tokdata.VocabMismatch, match=r"token id 70000 in .*big.bin is >= spec "
                       r"vocab 65536"):
        data.load_for_model(lm(65536), big, dtype="uint32")
    assert data.load_for_model(lm(70001), big, dtype="uint32").train_tokens == 900
    short = tmp_path / "s.bin"
    np.arange(30, dtype=np.uint16).tofile(short)
    with pytest.raises(DataError, match=r"validation part has 3 tokens, too few for one "
                       r"sequence of seq_len 16"):
        data.load_for_model(lm(256), short, dtype="uint16")
    with pytest.raises(DataError, match="token dtype is unknown"):
        data.load_for_model(lm(256), short)
    with pytest.raises(DataError, match="applies to .bin token files only"):
        data.load_for_model(lm(256), TEXT[0], dtype="uint16")


def test_nanogpt_folder_meta_pkl_is_never_unpickled(tmp_path: Path) -> None:
    root = tmp_path / "shakespeare"
    root.mkdir()
    np.arange(500, dtype=np.uint16).tofile(root / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(root / "val.bin")
    marker = tmp_path / "pwned"
    # a pickle that would create `marker` if anything unpickled it
    (root / "meta.pkl").write_bytes(
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with pytest.raises(DataError, match=r"meta.pkl is a pickle, which blockdsl never loads"):
        data.load_for_model(lm(512), root)
    assert not marker.exists()
    d = data.load_for_model(lm(512), root, dtype="uint16")
    assert (d.train_tokens, len(d.val)) == (500, 100)
    (root / "meta.json").write_text('{"dtype": "uint32"}')
    with pytest.raises(DataError, match="contradicts"):
        data.load_for_model(lm(512), root, dtype="uint16")
    (root / "meta.json").write_text('{"dtype": "uint16", "vocab_size": 400}')
    with pytest.raises(DataError, match=r"token id 499 .* >= the vocab_size 400"):
        data.load_for_model(lm(400), root)


def test_max_id_scan_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "ids.bin"
    np.array([1, 2, 3, 9], dtype=np.uint16).tofile(f)
    arr = tokdata.open_tokens(f, "uint16")
    assert tokdata.max_token_id(arr, f) == 9
    index = json.loads((tmp_path / "cache" / "tokens" / "maxid.json").read_text())
    assert list(index.values()) == [9]
    np.array([1, 2, 3, 11, 4], dtype=np.uint16).tofile(f)  # new size: scanned again
    assert tokdata.max_token_id(tokdata.open_tokens(f, "uint16"), f) == 11


# ----------------------------------------------------------------------------- train --data


def test_train_reads_the_token_ids(corpus: Path, tmp_path: Path) -> None:
    """tokenize -> train 5 steps: the step-0 evaluation equals the same initial model's loss
    on the memmap's validation windows, computed here by hand; bpb uses meta.json's ratio."""
    import blockdsl
    from blockdsl.lower import build_from_plan
    from blockdsl.train import seed_everything

    p = spec(tmp_path, 384)
    out = tmp_path / "run"
    assert main(["train", str(p), "--data", str(corpus), "--steps", "5", "--batch-size", "4",
                 "--eval-every", "5", "--eval-batches", "2", "--precision", "fp32",
                 "--quiet", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 5]

    seed_everything(0)
    model = build_from_plan(blockdsl.resolve(p), device="cpu", precision="fp32", batch=4)
    model.eval()
    val = np.fromfile(corpus / "val.bin", dtype=np.uint16).astype(np.int64)
    w = torch.from_numpy(np.stack([val[i * 32 : i * 32 + 33] for i in range(8)]))
    with torch.no_grad():
        logits = model(w[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten()).item()
    assert evals[0]["val_loss"] == pytest.approx(want, rel=1e-5)
    bpt = json.loads((corpus / "meta.json").read_text())["bytes_per_token"]
    for r in evals:
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2) / bpt)
        assert math.isfinite(r["val_loss"])


def test_vocab_mismatch_is_a_located_error_before_building(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = spec(tmp_path, 8000)
    out = tmp_path / "run"
    assert main(["train", str(p), "--data", str(corpus), "--steps", "5", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{p}:1:1: error: spec vocab 8000, data vocab 384: ")
    assert "hint: set stem tokens(vocab=384)" in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was built or written
    assert main(["train", str(p), "--data", str(TEXT[0]), "--data-dtype", "uint16",
                 "--steps", "1"]) == 1
    assert "--data-dtype applies to token ids" in capsys.readouterr().err


def test_search_refuses_a_vocab_mismatch_before_the_study(
        corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = Path(__file__).resolve().parents[1] / "search" / "moeut.block"  # vocab 256
    journal = tmp_path / "s.journal"
    assert main(["search", str(space), "--data", str(corpus), "--budget", "2", "--seconds",
                 "1", "--no-live", "--storage", str(journal), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert f"{space}:" in err and "error: spec vocab 256, data vocab 384" in err
    assert not journal.exists() and not (tmp_path / "s").exists()


def test_tokenize_a_folder_that_holds_the_output(tmp_path: Path) -> None:
    """Re-tokenizing a folder with --force never reads the previous corpus's own files."""
    root = tmp_path / "notes"
    root.mkdir()
    for f in TEXT[:2]:
        (root / f.name).write_bytes(f.read_bytes())
    args = ["tokenize", str(root), "--train-bpe", "300", "--out", str(root / "tok"), "--quiet"]
    assert main(args) == 0
    first = json.loads((root / "tok" / "meta.json").read_text())
    assert main([*args, "--force"]) == 0
    again = json.loads((root / "tok" / "meta.json").read_text())
    assert again == first and first["files"] == 2
