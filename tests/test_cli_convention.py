"""Issue 16's CLI items, through the real command line: one convention for every command
(flags, defaults, hidden aliases of the old spellings), `search`'s user errors and hints,
`train`'s progress bar, finished-run resume and metrics rows, `compile`'s table when piped
or narrow, and result files that respect the umask. Real subprocesses, pseudo-terminals and
training runs on the built-in corpus; nothing is mocked."""

from __future__ import annotations

import json
import os
import pty
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import blockdsl
from blockdsl.cli import common as C
from blockdsl.cli import main, make_parser
from tests.test_search import TINY

ROOT = Path(__file__).resolve().parent.parent
TINY_GPT = ROOT / "specs" / "tiny" / "gpt.block"
GPT2 = ROOT / "specs" / "gpt2-small.block"
FAST = ["--batch", "4", "--seq", "32", "--warmup", "2", "--eval-batches", "1"]


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None, umask: int | None = None,
         timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blockdsl.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, **(env or {})},
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def _tty_stderr(*args: str, cwd: Path, columns: int) -> tuple[int, str, str]:
    """Run the CLI with stderr (and, for compile, stdout) on a pseudo-terminal."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm"}
    p = subprocess.Popen([sys.executable, "-m", "blockdsl.cli", *args], cwd=cwd, env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = p.stdout.read().decode() if p.stdout else ""
    return p.wait(timeout=180), out, b"".join(chunks).decode(errors="replace")


def _help(*cmd: str) -> None:
    """Print a command's --help (captured by capsys); it exits 0."""
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args([*cmd, "--help"])
    assert exc.value.code == 0


# ----------------------------------------------------------------------------- the convention


@pytest.mark.parametrize("cmd", ["check", "compile", "train", "search", "compare"])
def test_every_command_spells_the_flags_alike(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    _help(cmd)
    text = capsys.readouterr().out
    assert re.search(r"\bSPEC\b", text) and "--model" in text
    assert "--json" in text and "--quiet" in text
    if cmd != "check":  # the commands that run torch
        assert "--precision {fp32,fp32-medium,bf16}" in text and "--device" in text
        assert "bf16 (default" in re.sub(r"\s+", " ", text)  # the one default, stated
        assert "--batch N" in text and "--seq N" in text and "--out" in text
    # the old spellings are accepted but hidden
    for old in ("--batch-size", "--seq-len", "--space", "--no-live", "--file"):
        assert old not in text


def test_the_top_level_help_documents_the_convention(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "every command follows one convention" in text
    assert "--precision P      fp32 | fp32-medium | bf16 (default bf16, on every command)" in text
    assert "2 an internal\nerror" in text or "2 an internal error" in text


def test_one_precision_default_everywhere(tmp_path: Path) -> None:
    from blockdsl import search as S

    p = make_parser()
    assert p.parse_args(["compile", "x.block"]).precision == C.DEFAULT_PRECISION == "bf16"
    assert p.parse_args(["train", "x.block"]).precision == C.DEFAULT_PRECISION
    # search leaves the flag unset so a resumed study keeps its own; the default is the same
    assert p.parse_args(["search"]).precision is None
    space = S.load_space(_space(tmp_path))
    assert S.make_config(space).precision == C.DEFAULT_PRECISION


@pytest.mark.parametrize("argv,dest,value", [
    (["compile", "x.block", "--batch-size", "3"], "batch", 3),
    (["compile", "x.block", "--seq-len", "9"], "seq", 9),
    (["train", "x.block", "--batch-size", "8"], "batch", 8),
    (["train", "x.block", "--seq-len", "16"], "seq", 16),
    (["train", "x.block", "--no-live"], "quiet", True),
    (["search", "--space", "brainformer"], "space_name", "brainformer"),
    (["search", "--batch-size", "4"], "batch_size", 4),
    (["search", "--seq-len", "12"], "seq_len", 12),
    (["search", "--no-live"], "live", False),
    (["search", "--storage", "j", "show", "s", "--write"], "write", True),
])
def test_old_spellings_are_hidden_aliases(argv: list[str], dest: str, value: object) -> None:
    args = make_parser().parse_args(argv)
    assert getattr(args, dest) == value
    new = {"--batch-size": "--batch", "--seq-len": "--seq", "--space": "--model",
           "--no-live": "--quiet"}
    old = next((a for a in argv if a in new), None)
    if old is not None:  # the new spelling lands in the same place
        again = make_parser().parse_args([new[old] if a == old else a for a in argv])
        assert getattr(again, dest) == value
    # an alias has no default of its own: left out, the documented flag's default stands
    base = make_parser().parse_args(argv[:2] if argv[0] != "search" else argv[:1])
    assert getattr(base, dest) != value


def test_alias_values_are_checked_like_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", str(TINY_GPT), "--batch-size", "0"])
    assert exc.value.code == 1
    assert "argument --batch-size: expected an integer > 0, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["search", "--seq-len", "-1"])
    assert exc.value.code == 1
    assert "argument --seq-len: expected a positive integer, got -1" in capsys.readouterr().err


def test_check_json_and_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(TINY_GPT), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    rep = blockdsl.report(TINY_GPT)
    assert got["model"] == "gpt_tiny" and got["stored_params"] == rep.stored_params == 824_448
    assert got["sublayers"] == rep.layers and got["flops_per_token"] == rep.flops_per_token
    assert main(["check", str(TINY_GPT), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_outputs_are_named_by_the_model(tmp_path: Path) -> None:
    """`specs/tiny/gpt.block` holds model gpt_tiny: out/gpt_tiny and runs/gpt_tiny, not gpt."""
    p = _cli("compile", str(TINY_GPT), "--quiet", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout == "", p.stderr
    assert sorted(f.name for f in (tmp_path / "out" / "gpt_tiny").iterdir()) == [
        "graph.svg", "resolved.block", "summary.json"]
    p = _cli("compile", str(TINY_GPT), "--json", "--out", str(tmp_path / "mine"), cwd=tmp_path)
    assert json.loads(p.stdout)["artifacts"]["graph"] == str(tmp_path / "mine" / "graph.svg")


# ----------------------------------------------------------------------------- search


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.block"
    path.write_text(TINY)
    return path


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_search_budget_must_be_positive(value: str, tmp_path: Path) -> None:
    p = _cli("search", str(_space(tmp_path)), "--budget", value, cwd=tmp_path)
    assert p.returncode == 1
    assert f"argument --budget: expected a positive integer, got {value if value != 'two' else repr(value)}" \
        in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "studies").exists()


def test_search_device_is_checked_like_train_s(tmp_path: Path) -> None:
    p = _cli("search", str(_space(tmp_path)), "--device", "bogus", "--budget", "1", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: unknown device 'bogus'")
    t = _cli("train", str(TINY_GPT), "--device", "bogus", cwd=tmp_path)
    assert t.returncode == 1 and t.stderr.startswith("error: unknown device 'bogus'")


def test_search_data_is_checked_before_the_study_starts(tmp_path: Path) -> None:
    """Bad data is one error before any trial runs, not a failure in every trial of a
    search that then ends with exit 0 and nothing found."""
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"not really")
    for data, message in (("nope.txt", "error: data path not found: nope.txt"),
                          ("imgs", "holds images, but the model is a language model")):
        p = _cli("search", str(_space(tmp_path)), "--data", data, "--budget", "3", cwd=tmp_path)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert message in p.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "studies").exists()


def test_search_show_errors_and_help(tmp_path: Path) -> None:
    p = _cli("search", "show", "nope", cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip() == "error: no study 'nope' in studies/ (pass --storage for others)"
    p = _cli("search", "show", "nope", "--storage", str(tmp_path / "x.journal"), cwd=tmp_path)
    assert p.returncode == 1 and p.stderr.strip().startswith("error: no such journal file:")
    assert not (tmp_path / "x.journal").exists()
    p = _cli("search", "show", "--help", cwd=tmp_path)
    assert p.returncode == 0
    assert p.stdout.startswith("usage: blockdsl search show [-h]")
    assert "STUDY" in p.stdout and "--write" in p.stdout and "--storage" in p.stdout
    for search_only in ("--budget", "--workers", "--sampler", "SPEC"):
        assert search_only not in p.stdout
    p = _cli("search", "show", cwd=tmp_path)
    assert p.returncode == 1 and "the following arguments are required: STUDY" in p.stderr


@pytest.mark.slow  # a 2-trial search of a tiny space: ~10 s
def test_search_inspect_hint_names_the_storage(tmp_path: Path) -> None:
    journal = tmp_path / "elsewhere" / "k.journal"
    journal.parent.mkdir()
    p = _cli("search", str(_space(tmp_path)), "--study", "k", "--budget", "2", "--seconds",
             "0.5", "--quiet", "--storage", str(journal), cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    hint = f"inspect: blockdsl search show k --storage {journal}   |   optuna-dashboard {journal}"
    assert hint in p.stdout
    # and the hint works as printed
    show = _cli("search", "show", "k", "--storage", str(journal), "--quiet", cwd=tmp_path)
    assert show.returncode == 0 and show.stdout.startswith("k: 2/2 trials"), show.stdout
    assert "baseline" in show.stdout


# ----------------------------------------------------------------------------- train


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_progress_bar_shows_the_total(tmp_path: Path) -> None:
    rc, _, err = _tty_stderr("train", str(TINY_GPT), "--steps", "6", "--eval-every", "3",
                             "--out", str(tmp_path / "a"), *FAST, cwd=tmp_path, columns=200)
    assert rc == 0, err
    assert re.search(r"step [1-5]/6\b", err) and "step 6/6" in err
    assert not re.search(r"step \d+ ", err.replace("step 6/6", ""))  # never a bare count
    # a token budget is shown as the steps it buys: 600 tokens / (4 x 32) per step = 5 steps
    rc, _, err = _tty_stderr("train", str(TINY_GPT), "--tokens", "600", "--out",
                             str(tmp_path / "b"), *FAST, cwd=tmp_path, columns=200)
    assert rc == 0 and "step 5/5" in err, err


def test_train_progress_bar_shows_a_time_budget_as_a_share(tmp_path: Path) -> None:
    rc, _, err = _tty_stderr("train", str(TINY_GPT), "--seconds", "1", "--eval-every", "1000",
                             "--out", str(tmp_path / "a"), *FAST, cwd=tmp_path, columns=200)
    assert rc == 0, err
    shares = [int(s) for s in re.findall(r"step \d+ \((\d+)% of 1 s\)", err)]
    assert shares and shares[-1] == 100 and shares == sorted(shares)


def test_resume_of_a_finished_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", str(TINY_GPT), "--steps", "6", "--eval-every", "3", "--out", str(out), *FAST]
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.rglob("*") if f.is_file()}
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 3, 6]
    again = _cli(*args, "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    val = [r for r in rows if r["kind"] == "eval"][-1]["val_loss"]
    assert again.stdout.strip() == (
        f"already finished: {out} reached its budget at step 6 (val loss {val:.4f}); nothing "
        "was trained or written (raise --steps, --tokens or --seconds to train further)")
    after = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.rglob("*") if f.is_file()}
    assert after == before
    # --json says the same, machine-readably
    j = _cli(*args, "--resume", "--json", cwd=tmp_path)
    got = json.loads(j.stdout)
    assert got["stopped_by"] == "finished" and got["steps"] == 6 and got["val_loss"] == val
    # a larger budget continues from the checkpoint: one new eval row per new eval step
    more = _cli(*args[:3], "9", *args[4:], "--resume", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    steps = [r["step"] for r in _rows(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert steps == [0, 3, 6, 9]


def test_tokens_is_an_int_in_every_metrics_row(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = _cli("train", str(TINY_GPT), "--steps", "10", "--eval-every", "5", "--out", str(out),
             *FAST, cwd=tmp_path)  # a train row every 10 steps (log_every)
    assert p.returncode == 0, p.stderr
    rows = _rows(out / "metrics.jsonl")
    assert {r["kind"] for r in rows} == {"train", "eval", "summary"}
    for r in rows:
        assert type(r["tokens"]) is int, r
    per_step = 4 * 32  # --batch x --seq
    assert [r["tokens"] for r in rows if r["kind"] == "eval"] == [0, 5 * per_step, 10 * per_step]


# ----------------------------------------------------------------------------- compile


def _numbers(spec: Path) -> list[str]:
    rep = blockdsl.report(spec)
    nums = [f"{rep.stored_params:,}", f"{rep.active_params_per_token:,}",
            f"{rep.flops_per_token:,.0f}"]
    nums += [f"{r.params:,}" for r in rep.rows if r.owner]
    return nums


def test_compile_table_piped_at_80_columns_keeps_every_number(tmp_path: Path) -> None:
    p = _cli("compile", str(GPT2), "--out", str(tmp_path / "o"), cwd=tmp_path,
             env={"COLUMNS": "80"})
    assert p.returncode == 0, p.stderr
    assert "…" not in p.stdout
    for n in _numbers(GPT2):
        assert n in p.stdout
    assert "layer[11].ffn" in p.stdout and "pre/layernorm" in p.stdout
    assert max(len(line) for line in p.stdout.splitlines()) <= 160


def test_compile_table_on_a_narrow_terminal_keeps_every_number(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "80", "TERM": "xterm"}
    p = subprocess.Popen([sys.executable, "-m", "blockdsl.cli", "compile", str(GPT2), "--out",
                          str(tmp_path / "o")], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert p.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode())
    assert "…" not in text
    for n in _numbers(GPT2):
        assert n in text


# ----------------------------------------------------------------------------- umask


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
            for p in [root, *root.rglob("*")]}


def test_run_and_artifact_folders_respect_the_umask(tmp_path: Path) -> None:
    """umask 027: folders 0750 and files 0640, not mkdtemp's 0700 / mkstemp's 0600."""
    p = _cli("train", str(TINY_GPT), "--steps", "4", "--eval-every", "2", "--ckpt-every", "2",
             *FAST, "--quiet", cwd=tmp_path, umask=0o027)
    assert p.returncode == 0, p.stderr
    p = _cli("compile", str(TINY_GPT), "--quiet", cwd=tmp_path, umask=0o027)
    assert p.returncode == 0, p.stderr
    for root in (tmp_path / "runs" / "gpt_tiny", tmp_path / "out" / "gpt_tiny"):
        modes = _modes(root)
        assert len(modes) > 3
        for name, mode in modes.items():
            want = 0o750 if (root / name).is_dir() else 0o640
            assert mode == want, (root, name, oct(mode))
    runs = _modes(tmp_path / "runs" / "gpt_tiny")
    assert {"metrics.jsonl", "latest", "ckpt-00000004/model.safetensors"} <= set(runs)
