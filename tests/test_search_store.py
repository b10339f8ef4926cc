"""The search's journal storage after a kill, and files that are not journals.

Real processes, real locks, real `kill -9`, all through the CLI; nothing is mocked. The
kill test takes the journal's locks in a helper process exactly where a worker appending a
record holds them, leaves half a record in the file, and is SIGKILLed there.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from blockdsl import search as S
from blockdsl.cli import main
from tests.test_search import TINY

# Takes both locks a worker of this or an earlier version holds while appending (Optuna's
# symlink lock on the path as given, as earlier versions used; our flock), writes half a
# record, says so, and waits to be killed.
HOLDER = """
import sys, time
from optuna.storages.journal import JournalFileSymlinkLock
from blockdsl.search.journal import JournalBackend
path = sys.argv[1]
JournalFileSymlinkLock(path).acquire()
backend = JournalBackend(path)
backend._lock.acquire()
with open(path, "ab") as f:
    f.write(b'{"op_code":5,"worker_id":"killed-mid-')
    f.flush()
print("holding", flush=True)
time.sleep(600)
"""


@pytest.fixture(autouse=True)
def _quiet() -> None:
    S.quiet_optuna()


def _cli(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "blockdsl.cli", "search", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _trials(journal: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=S.open_storage(str(journal), name)).get_trials()


def _lock_is_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing releases it if we got it
    return True


@pytest.mark.slow  # three CLI runs that train 1-2 tiny trials each: ~15 s
def test_a_worker_killed_while_holding_the_journal_lock_mid_append(tmp_path: Path) -> None:
    (tmp_path / "tiny.block").write_text(TINY)
    journal = tmp_path / "studies" / "k.journal"
    first = _cli(["tiny.block", "--study", "k", "--budget", "2", "--seconds", "0.5", "--no-live"],
                 tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "studies/k.journal"], cwd=tmp_path,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert not _lock_is_free(Path(f"{journal}.flock"))  # it really holds the lock
        assert os.path.islink(f"{journal}.lock") and not os.path.exists(f"{journal}.lock")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert _lock_is_free(Path(f"{journal}.flock"))  # the kernel released it
    torn = journal.read_bytes()
    assert not torn.endswith(b"\n")

    # The resume used to spin forever on the dangling symlink; the timeout is the guard.
    out = _cli(["--study", "k", "--budget", "3", "--no-live"], tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert f"removed the stale lock {journal}.lock" in out.stderr
    assert "its last record was cut off by a killed worker" in out.stderr
    backups = list(journal.parent.glob("k.journal.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == torn  # the original, byte for byte
    assert journal.read_bytes().startswith(torn[: torn.rindex(b"\n") + 1])
    assert journal.read_bytes().endswith(b"\n")
    ts = _trials(journal, "k")
    assert len(S.counted_trials(ts)) == 3 and all(t.state.is_finished() for t in ts)

    show = _cli(["show", "k"], tmp_path, timeout=60)
    assert show.returncode == 0 and "baseline" in show.stdout, show.stderr
    assert not os.path.lexists(f"{journal}.lock")


def _journal_with_records(tmp_path: Path, name: str = "j") -> Path:
    path = tmp_path / f"{name}.journal"
    storage = S.open_storage(str(path), name)
    study = optuna.create_study(study_name=name, storage=storage)
    study.set_user_attr("a", 1)
    study.enqueue_trial({"x": 1})
    return path


def test_a_torn_last_line_is_cut_off_with_a_backup_before_anything_is_appended(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _journal_with_records(tmp_path)
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"ab')  # a writer killed mid-line
    torn = path.read_bytes()
    # `show` only reads: it works, and repairs under the lock (nobody holds it here).
    assert main(["search", "show", "j", "--storage", str(path), "--json"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cut off by a killed worker" in err and str(path) in err
    assert path.read_bytes() == good
    (backup,) = tmp_path.glob("j.journal.bak-*")
    assert backup.read_bytes() == torn
    # A second torn tail later gets a second backup; the first is never overwritten.
    with open(path, "ab") as f:
        f.write(b'{"op_co')
    study = optuna.load_study(study_name="j", storage=S.open_storage(str(path), "j"))
    study.set_user_attr("b", 2)
    assert len(list(tmp_path.glob("j.journal.bak-*"))) == 2 and backup.read_bytes() == torn
    assert optuna.load_study(study_name="j", storage=S.open_storage(str(path), "j")).user_attrs \
        == {"a": 1, "b": 2}


def test_the_torn_tail_is_also_checked_at_every_append(tmp_path: Path) -> None:
    """A fragment that appears after the storage was opened (a worker killed while this one
    runs) is cut off by the next append, under the lock, not appended after."""
    path = _journal_with_records(tmp_path)
    storage = S.open_storage(str(path), "j")
    study = optuna.load_study(study_name="j", storage=storage)
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"ab')
    study.set_user_attr("after", True)
    fresh = optuna.load_study(study_name="j", storage=S.open_storage(str(path), "j"))
    assert fresh.user_attrs == {"a": 1, "after": True}
    assert len(list(tmp_path.glob("j.journal.bak-*"))) == 1


def test_damage_before_the_last_line_is_a_located_error_and_the_file_is_untouched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # What earlier versions made of a torn tail: the next record appended after the fragment.
    path = _journal_with_records(tmp_path)
    lines = path.read_bytes().count(b"\n")
    with open(path, "ab") as f:
        f.write(b'{"op_code":4,"worker_id":"ab')
    with open(path, "ab") as f:  # old behaviour: append after the fragment, then go on
        f.write(b'{"op_code":1,"worker_id":"w","study_id":0,"user_attr":{"c":3}}\n' * 2)
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    for argv in (["search", "show", "j", "--storage", str(path)],
                 ["search", "--study", "j", "--storage", str(path), "--budget", "1"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{path}:{lines + 1}: damaged journal record" in err
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob("*.bak-*"))


def _bad_storages(tmp_path: Path) -> dict[str, Path]:
    bad = {"folder": tmp_path / "afolder", "binary": tmp_path / "garbage.bin",
           "text": tmp_path / "notes.txt", "fifo": tmp_path / "pipe",
           "json": tmp_path / "other.json", "not-replayable": tmp_path / "fake.journal"}
    bad["folder"].mkdir()
    bad["binary"].write_bytes(bytes(range(256)) * 8)
    bad["text"].write_text("these are my notes\nnot a journal\n")
    os.mkfifo(bad["fifo"])
    bad["json"].write_text(json.dumps({"a": [1, 2]}) + "\n")
    bad["not-replayable"].write_text('{"op_code": 0}\n')
    return bad


@pytest.mark.timeout(120)  # a FIFO opened for reading would block forever
def test_a_storage_that_is_no_journal_is_a_one_line_error_and_left_untouched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "tiny.block"
    space.write_text(TINY)
    for kind, path in _bad_storages(tmp_path).items():
        stat = path.stat()
        content = path.read_bytes() if path.is_file() else None
        for argv in (["search", str(space), "--storage", str(path), "--budget", "1"],
                     ["search", "show", "x", "--storage", str(path)]):
            assert main(argv) == 1, (kind, argv)
            out, err = capsys.readouterr()
            assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err, \
                (kind, err)
            assert "Traceback" not in err and "internal error" not in err
        after = path.stat()
        assert (after.st_mtime_ns, after.st_size, after.st_mode) == \
            (stat.st_mtime_ns, stat.st_size, stat.st_mode), kind
        if content is not None:
            assert path.read_bytes() == content, kind
        assert not list(tmp_path.glob("*.bak-*")) and not list(tmp_path.glob("*.flock")), kind


def test_show_on_a_missing_journal_creates_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "typo.journal"
    assert main(["search", "show", "x", "--storage", str(path)]) == 1
    assert "no such journal file" in capsys.readouterr().err
    assert not path.exists()


# ----------------------------------------------------------------------------- result files


def _finished(study: optuna.Study, value: float, **attrs: object) -> None:
    from optuna.trial import TrialState, create_trial

    study.add_trial(create_trial(state=TrialState.COMPLETE, value=value,
                                 user_attrs={"status": "trained", **attrs}))


def test_a_copy_of_the_baseline_is_not_reported_as_the_best_block(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "b.journal"
    study = optuna.create_study(study_name="b", storage=S.open_storage(str(journal), "b"))
    block = "model m {\n  d = 32\n}\n"
    _finished(study, 2.5, role="baseline", arch_hash="h0", arch="base", block=block)
    _finished(study, 2.5, status="copy", copy_of=0, arch_hash="h0", arch="base", block=block)
    _finished(study, 2.7, arch_hash="h1", arch="worse", block=block)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "best.block").write_text("# from an earlier write\n")
    assert main(["search", "show", "b", "--storage", str(journal), "--write", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no searched block beat the baseline (trial 0)" in text
    assert "trial 2: 2.7000" in text and "+0.0000" not in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"] == [] and summary["beats_baseline"] is False
    assert summary["closest"]["number"] == 2 and summary["files"]["blocks"] == []
    assert not (out / "best.block").exists() and (out / "baseline.block").exists()

    _finished(study, 2.4, arch_hash="h2", arch="better", block=block)
    assert main(["search", "show", "b", "--storage", str(journal), "--write", "--out", str(out),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [b["number"] for b in summary["best"]] == [3] and summary["beats_baseline"] is True
    assert (out / "best.block").read_text().startswith("# blockdsl search: study b, trial 3")


@pytest.mark.slow  # two worker processes that train: 20-40 s
def test_two_workers_results_are_written_once_whole_and_with_the_users_umask(tmp_path: Path) -> None:
    (tmp_path / "tiny.block").write_text(TINY)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        ["sh", "-c", "umask 027 && exec \"$0\" -m blockdsl.cli search tiny.block --study w "
         "--workers 2 --budget 5 --seconds 0.5 --no-live", sys.executable],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("wrote ") == 1
    folder = tmp_path / "studies" / "w"
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names  # no temp file left behind
    for name in ("summary.json", "history.png", "baseline.block"):
        assert (folder / name).stat().st_mode & 0o777 == 0o640, name
    summary = json.loads((folder / "summary.json").read_text())
    ts = _trials(tmp_path / "studies" / "w.journal", "w")
    assert summary["counted"] == len(S.counted_trials(ts)) == 5
    assert summary["wall_seconds_this_run"] > 0
    study = optuna.load_study(study_name="w", storage=S.open_storage(
        str(tmp_path / "studies" / "w.journal"), "w"))
    assert summary["by_status"] == S.summarize(study)["by_status"]
    assert ("best.block" in names) == bool(summary["best"]) == summary["beats_baseline"]


# ----------------------------------------------------------------------------- search spaces

DYNAMIC = TINY.split("space tiny")[0] + """
space dyn extends dense {
  d = {16 | 32}
  block cell {
    s0 mha(heads=2, bias=false) norm=pre
    s1 mlp(d_ff={2*d | 4*d}, act=gelu, bias=false) norm=pre
  }
  baseline dense
  minimize val_loss
  budget search(trials=6, seconds=0.3, batch_size=8, eval_batches=2, prune=false, sampler=random)
}
"""


@pytest.mark.slow  # six tiny trials: ~10 s
def test_an_inline_choice_computed_from_another_choice_is_searched(tmp_path: Path) -> None:
    from blockdsl.lang.parse import load_module
    from blockdsl.lang.resolve import resolve

    (tmp_path / "dyn.block").write_text(DYNAMIC)
    check = subprocess.run([sys.executable, "-m", "blockdsl.cli", "check", "dyn.block"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    out = _cli(["dyn.block", "--study", "dyn", "--no-live"], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    ts = _trials(tmp_path / "studies" / "dyn.journal", "dyn")
    assert len(ts) == 6 and all(t.state.name == "COMPLETE" for t in ts), \
        [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in ts]
    searched = [t for t in ts if t.user_attrs.get("role") != "baseline"]
    assert {t.params["d"] for t in searched} == {16, 32}  # both widths were tried
    for t in searched:
        assert t.params["cell.s1.d_ff@option"] in (0, 1)
        plan = resolve(load_module(t.user_attrs["block"]))
        (d_ff,) = {la.args["d_ff"] for la in plan.layers if la.prim == "mlp"}
        assert plan.d == t.params["d"] and d_ff == (2, 4)[t.params["cell.s1.d_ff@option"]] * plan.d


def test_a_study_refuses_trials_of_another_space(tmp_path: Path) -> None:
    """Naming an existing study with another space would mix two spaces' trials in one
    sampler history and one 'best block'. The same space file resumes it, edited or not,
    and so does a copy of it in another folder (each machine sharing a PostgreSQL study
    runs its own checkout)."""
    a, b = tmp_path / "a.block", tmp_path / "b.block"
    a.write_text(TINY)
    b.write_text(TINY)
    journal = tmp_path / "s.journal"
    S.prepare(a, study="s", storage=str(journal), root=tmp_path)
    with pytest.raises(S.SearchError, match="study 's' searches space .* of .*a.block, not .* of "
                                           ".*b.block: name a new study"):
        S.prepare(b, study="s", storage=str(journal), root=tmp_path)
    a.write_text(TINY + "\n# edited\n")
    S.prepare(a, study="s", storage=str(journal), root=tmp_path)
    elsewhere = tmp_path / "other-machine" / "a.block"
    elsewhere.parent.mkdir()
    elsewhere.write_text(TINY)
    again = S.prepare(elsewhere, study="s", storage=str(journal), root=tmp_path)
    assert len(again.study.get_trials(deepcopy=False)) >= 1  # the baseline, enqueued once
