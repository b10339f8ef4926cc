"""Hostile specs found by adversarial QA of issue 10, each through the real CLI.

Every case runs `blockdsl check` in a subprocess with a timeout that only guards against a
hang (no wall-time assert): the spec must end with exit 0 and `ok:` when it is valid, or
with exit 1 and a one-line located error (file:line:col) when it is not; never a
traceback, never exit 2.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SPACE = """{pre}
model dense {{
  d = 32
  stem tokens(vocab=64, context=16)
  head lm(tie=true)
  block cell {{
    s0 mha(heads=2)
    s1 mlp(d_ff=64)
  }}
  repeat 2 cell
}}
space sp extends dense {{
  block cell {{
    s0 mha(heads=2)
    s1 {ffn}
  }}
  baseline dense
  minimize val_loss
}}
"""


def check(tmp_path: Path, text: str, name: str = "spec.block") -> tuple[int, str, str]:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    p = subprocess.run([sys.executable, "-m", "blockdsl.cli", "check", str(path)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode in (0, 1), (p.returncode, p.stderr)
    return p.returncode, p.stdout, p.stderr


def test_choice_over_variables_that_fan_out_is_checked_promptly(tmp_path: Path) -> None:
    """`v1 = v0 + v0`, ..., `v40 = v39 + v39` is 41 small lines; whether a choice option
    reads a choice used to be decided by re-walking every reference: 2**40 steps (a hang)."""
    fan = "".join(f"v{i + 1} = v{i} + v{i}\n" for i in range(40)) + "v0 = 1\n"
    rc, out, err = check(tmp_path, SPACE.format(pre=fan, ffn="mlp(d_ff={v40 // 2**34 * 2 | 64})"))
    assert rc == 0 and out.startswith("ok: ") and "1 search choices" in out, (out, err)


def test_a_long_chain_of_variables_is_a_located_error(tmp_path: Path) -> None:
    """`v0 = v1 + 1`, `v1 = v2 + 1`, ... 500 deep (8 KB) was a RecursionError, exit 2."""
    chain = "".join(f"v{i} = v{i + 1} + 1\n" for i in range(500)) + "v500 = 1\n"
    text = SPACE.format(pre=chain, ffn="mlp(d_ff=v0)")
    rc, _, err = check(tmp_path, text)
    head = err.splitlines()[0]
    assert rc == 1 and head.startswith(f"{tmp_path / 'spec.block'}:101:1: error: "), err
    assert "variables nested more than 100 deep" in head and "v0 -> v1 -> ... -> v100" in head


def test_a_chain_of_100_variables_is_fine(tmp_path: Path) -> None:
    chain = "".join(f"v{i} = v{i + 1} + 1\n" for i in range(99)) + "v99 = 1\n"
    rc, out, err = check(tmp_path, SPACE.format(pre=chain, ffn="mlp(d_ff=v0 - 35)"))
    assert rc == 0 and out.startswith("ok: "), err


def test_variables_of_deeply_nested_expressions_are_a_located_error(tmp_path: Path) -> None:
    """99 variables, each 50 negations of the next (6 KB): within the depth cap, but
    Python's stack ran out (RecursionError, exit 2)."""
    chain = "".join(f"v{i} = " + "-" * 50 + f"v{i + 1}\n" for i in range(99)) + "v99 = 1\n"
    rc, _, err = check(tmp_path, SPACE.format(pre=chain, ffn="mlp(d_ff=v0 + 63)"))
    head = err.splitlines()[0]
    assert rc == 1 and head.startswith(f"{tmp_path / 'spec.block'}:"), err
    assert "is nested too deeply" in head


def test_a_byte_order_mark_crlf_and_tabs_are_plain_spec_text(tmp_path: Path) -> None:
    """A spec saved by a Windows editor (BOM, CRLF, tabs) was 'unexpected character
    \\ufeff' at 1:1; an included one too."""
    text = SPACE.format(pre="", ffn="mlp(d_ff={32 | 64})").replace("  ", "\t").replace("\n", "\r\n")
    (tmp_path / "inc.block").write_bytes(b"\xef\xbb\xbfw = 3\r\n")
    rc, out, err = check(tmp_path, b"\xef\xbb\xbf" + ('include "inc.block"\r\n' + text).encode())
    assert rc == 0 and out.startswith("ok: ") and "1 search choices" in out, err
    # and a located error after a BOM still points at the right line and column
    rc, _, err = check(tmp_path, b"\xef\xbb\xbf" + SPACE.format(pre="", ffn="mlp(d_ff=x)").encode())
    assert rc == 1 and err.startswith(f"{tmp_path / 'spec.block'}:15:12: error: "), err


def _search(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockdsl.cli", "search", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_bad_search_settings_are_one_line_errors_before_anything_runs(tmp_path: Path) -> None:
    """`--seconds nan` and `--seed 99999999999999` were internal errors (exit 2); `--batch-size
    0` or a negative time on the budget line ran a study whose every trial failed."""
    from tests.test_search import TINY

    (tmp_path / "tiny.block").write_text(TINY)
    for flags, words in [(["--seconds", "nan"], "--seconds nan: must be a finite number > 0"),
                         (["--seed", "99999999999999"], "--seed 99999999999999: must be an integer"),
                         (["--seed", "-1"], "--seed -1: must be an integer >= 0")]:
        p = _search(tmp_path, "tiny.block", "--study", "s", *flags, "--no-live")
        assert p.returncode == 1 and p.stderr.startswith(f"error: {words}"), (flags, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "Traceback" not in p.stderr
    # counts that argparse's type checks refuse: the usage, then one error line, exit 1
    for flag in ("--batch", "--batch-size", "--budget"):
        p = _search(tmp_path, "tiny.block", "--study", "s", flag, "0", "--no-live")
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1] == (
            f"blockdsl search: error: argument {flag}: expected a positive integer, got 0"), p.stderr
    assert not (tmp_path / "studies").exists()  # refused before the study was created
    bad = TINY.replace("seconds=1,", "seconds=0-1,")
    (tmp_path / "bad.block").write_text(bad)
    p = _search(tmp_path, "bad.block", "--study", "s", "--no-live")
    line = bad.splitlines().index(next(x for x in bad.splitlines() if "seconds=0-1" in x)) + 1
    col = bad.splitlines()[line - 1].index("seconds=") + 1
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith(f"bad.block:{line}:{col}: error: budget setting "
                               "seconds=-1 must be a finite number > 0"), p.stderr
    assert not (tmp_path / "studies").exists()


def test_train_seed_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    """`train --seed -1` / `--seed 1e23 as digits` were internal errors (exit 2) from seeding."""
    for seed, words in [("-1", "expected an integer >= 0"),
                        ("99999999999999999999999", "expected an integer from 0 to 2**63-1")]:
        p = subprocess.run([sys.executable, "-m", "blockdsl.cli", "train",
                            str(ROOT / "tests" / "specs" / "gqa_rope.block"), "--seed", seed,
                            "--out", str(tmp_path / "run")], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert f"argument --seed: {words}" in p.stderr.splitlines()[-1], p.stderr
        assert not (tmp_path / "run").exists()


def _train(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockdsl.cli", "train",
                           str(ROOT / "specs" / "tiny" / "gpt.block"), "--batch-size", "4",
                           "--seq-len", "32", "--eval-batches", "1", "--precision", "fp32",
                           "--quiet", "--ckpt-every", "2", *argv],
                          capture_output=True, text=True, timeout=300)


def test_train_resume_in_a_damaged_run_folder(tmp_path: Path) -> None:
    """A metrics.jsonl with bytes that are not UTF-8 or a row whose step is a string, and a
    `latest` that is a link to a binary file, were internal errors (exit 2); the link's
    target bytes must never be quoted."""
    import json

    out = tmp_path / "run"
    p = _train("--steps", "4", "--out", str(out))
    assert p.returncode == 0, p.stderr
    good = (out / "metrics.jsonl").read_bytes()
    (out / "metrics.jsonl").write_bytes(
        good + b'garbage\x00\xff\n{"step": "x"}\n[1, 2]\n{"step": null}\n{"kind": "train", "st')
    p = _train("--steps", "6", "--out", str(out), "--resume")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "metrics.jsonl").read_bytes().startswith(good)
    assert max(r["step"] for r in rows) == 6 and all(isinstance(r["step"], int) for r in rows)

    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET\x00\x01 line\n")
    for target in (secret, out / "ckpt-00000006" / "model.safetensors"):
        (out / "latest").unlink()
        (out / "latest").symlink_to(target)
        p = _train("--steps", "8", "--out", str(out), "--resume")
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip() == (f"error: {out / 'latest'} is not a regular file: remove it, "
                                    "or resume from a ckpt-<step> folder by deleting it"), p.stderr
    (out / "latest").unlink()
    (out / "latest").write_bytes(b"\x00\x01TOP-SECRET\xff")
    p = _train("--steps", "8", "--out", str(out), "--resume")
    assert p.returncode == 1 and "TOP-SECRET" not in p.stderr, p.stderr
    assert f"{out / 'latest'} names something, not a ckpt-<step> folder" in p.stderr


HOLDER = """
import sys, time
from blockdsl.search.journal import JournalBackend
path = sys.argv[1]
backend = JournalBackend(path)
backend._lock.acquire()
with open(path, "ab") as f:
    f.write(b'{"op_code":5,"worker_id":"live-mid-')
    f.flush()
print("holding", flush=True)
time.sleep(600)
"""


def _opened(pid: int, path: Path) -> bool:
    import os

    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.path.realpath(fd) == str(path) for fd in fds.iterdir())
    except OSError:
        return False


def test_a_journal_reached_through_a_symlink_takes_the_journal_s_own_lock(tmp_path: Path) -> None:
    """The lock file sat next to the name given, so a worker using a link to the journal
    took another lock than one using its real path, and "repaired" (cut off) the record a
    live writer was appending at that moment."""
    import shutil
    import time

    from tests.test_search import TINY

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to see which lock file a process opened")
    (tmp_path / "tiny.block").write_text(TINY)
    p = _search(tmp_path, "tiny.block", "--study", "k", "--budget", "1", "--seconds", "0.2",
                "--no-live")
    assert p.returncode == 0, p.stderr
    real = tmp_path / "data" / "k.journal"
    real.parent.mkdir()
    shutil.move(tmp_path / "studies" / "k.journal", real)
    (tmp_path / "link.journal").symlink_to(real)
    complete = real.read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(real)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    show = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        show = subprocess.Popen([sys.executable, "-m", "blockdsl.cli", "search", "show", "k",
                                 "--storage", "link.journal"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lock = Path(str(real) + ".flock")
        for _ in range(600):  # hang guard only: until show waits on the journal's own lock
            if _opened(show.pid, lock) or show.poll() is not None:
                break
            time.sleep(0.1)
        assert show.poll() is None, show.communicate()
        assert real.read_bytes().endswith(b'"worker_id":"live-mid-')  # the live line is intact
        holder.kill()
        holder.wait()
        out, err = show.communicate(timeout=120)
    finally:
        for proc in (holder, show):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert show.returncode == 0, err
    assert "its last record was cut off by a killed worker" in err  # now it is a dead one's
    assert real.read_bytes() == complete
    assert not (tmp_path / "link.journal.flock").exists()


@pytest.mark.parametrize(("ffn", "inner"), [
    ("mlp(d_ff={ {32 | 64} | 128})", "{32 | 64}"),
    ("mlp(d_ff={ 2 * {16 | 32} | 128 })", "{16 | 32}"),
    ("mlp(d_ff={ 16 .. {32 | 64} })", "{32 | 64}"),
])
def test_a_choice_written_inside_a_choice_is_a_located_error(tmp_path: Path, ffn: str,
                                                            inner: str) -> None:
    """`{ {32 | 64} | 128 }` passed check, and the search then sampled the inner choice
    under the outer one's name, apart from the option picked: trial parameters said
    d_ff=32 for a block built with d_ff=128."""
    text = SPACE.format(pre="", ffn=ffn)
    rc, _, err = check(tmp_path, text)
    line = text.splitlines().index(f"    s1 {ffn}") + 1
    col = f"    s1 {ffn}".index(inner) + 1
    assert rc == 1 and err.startswith(f"{tmp_path / 'spec.block'}:{line}:{col}: error: a choice "
                                      "inside a choice"), err
    assert "name the inner one" in err


def test_a_named_choice_inside_a_choice_is_searched(tmp_path: Path) -> None:
    rc, out, err = check(tmp_path, SPACE.format(pre="x = {32 | 64}", ffn="mlp(d_ff={x | 128})"))
    assert rc == 0 and "2 search choices" in out, err


def test_a_study_killed_while_it_was_being_created_is_never_filled_from_the_default_space(
        tmp_path: Path) -> None:
    """Killed after the study's first record but before it recorded its space file, a study
    resumed with `search --study NAME` ran the default (Brainformer) space inside it."""
    import os
    import signal
    import time

    import optuna

    from blockdsl import search as S
    from tests.test_search import TINY

    (tmp_path / "tiny.block").write_text(TINY)
    journal = tmp_path / "studies" / "c.journal"
    p = subprocess.Popen([sys.executable, "-m", "blockdsl.cli", "search", "tiny.block", "--study",
                          "c", "--budget", "1", "--seconds", "0.2", "--no-live"], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(6000):  # hang guard only: until the study's first record is written
            if journal.exists() and b"\n" in journal.read_bytes():
                break
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    storage = S.open_storage(str(journal), "c")
    recorded = "space_file" in optuna.load_study(study_name="c", storage=storage).user_attrs
    before = journal.read_bytes()
    p = _search(tmp_path, "--study", "c", "--budget", "1", "--seconds", "0.2", "--no-live")
    if not recorded:  # the usual case: the kill came before the next record
        assert p.returncode == 1 and p.stderr.strip() == (
            "error: study 'c' records no space file (its first run was stopped before recording "
            "it, or another tool created it): name the space, blockdsl search SPACE --study c"), \
            p.stderr
        assert journal.read_bytes() == before
        p = _search(tmp_path, "tiny.block", "--study", "c", "--budget", "1", "--seconds", "0.2",
                    "--no-live")
    assert p.returncode == 0, p.stderr
    assert "space tiny" in p.stdout and "brainformer" not in p.stdout, p.stdout
    attrs = optuna.load_study(study_name="c", storage=S.open_storage(str(journal), "c")).user_attrs
    assert {"space_file", "space", "baseline", "objectives", "constraints"} <= set(attrs)
    assert attrs["space"] == "tiny" and attrs["baseline"] == "dense"


def test_a_study_with_some_of_its_space_records_gets_the_rest(tmp_path: Path) -> None:
    """A kill between two of the records that describe the space left the rest unset for
    good: they were written only when the first one was missing."""
    import optuna

    from blockdsl import search as S
    from tests.test_search import TINY

    (tmp_path / "tiny.block").write_text(TINY)
    journal = tmp_path / "studies" / "c.journal"
    journal.parent.mkdir()
    st = optuna.create_study(study_name="c", storage=S.open_storage(str(journal), "c"))
    st.set_user_attr("space_file", str(tmp_path / "tiny.block"))  # then the kill
    p = _search(tmp_path, "--study", "c", "--budget", "1", "--seconds", "0.2", "--no-live")
    assert p.returncode == 0, p.stderr
    attrs = optuna.load_study(study_name="c", storage=S.open_storage(str(journal), "c")).user_attrs
    assert attrs["space"] == "tiny" and attrs["baseline"] == "dense"
    assert attrs["objectives"] == [["val_loss", "minimize"]] and attrs["constraints"] == []
