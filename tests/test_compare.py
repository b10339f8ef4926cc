"""`blockdsl compare`: the noise rule and size warnings on hand-made numbers, then real
comparisons of two tiny byte-level GPTs (tests/specs/compare_pair.block, 2 seeds, equal
steps): the table, results.json and both plots are written; a real kill of a real
`blockdsl compare` process mid-run loses no finished run and the resumed comparison gives
the very numbers of the uninterrupted one; mistakes are one-line errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockdsl.cli import main
from blockdsl.compare import difference, size_warnings, spread

ROOT = Path(__file__).resolve().parents[1]
PAIR = str(ROOT / "tests/specs/compare_pair.block")
# 20 steps with a checkpoint every 10: long enough to be killed mid-run
ARGS = ["--steps", "20", "--seeds", "2", "--eval-every", "10", "--eval-batches", "1",
        "--batch", "8", "--seq", "32", "--timing-steps", "2", "--threads", "1"]


# ----------------------------------------------------------------- the rules, by hand


def test_spread_by_hand() -> None:
    s = spread([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.min, s.max, s.n) == (2.0, 1.0, 1.0, 3.0, 3)
    assert spread([5.0]).std == 0.0


def test_difference_outside_and_inside_the_noise() -> None:
    # b lower on both seeds; means 1.0 vs 2.0, stds sqrt(0.02) each: se = 0.1414, t = -7.07
    d = difference("a", "b", {0: 2.1, 1: 1.9}, {0: 1.1, 1: 0.9})
    assert d.diff == pytest.approx(-1.0) and d.se == pytest.approx(math.sqrt(0.02))
    assert d.t == pytest.approx(-1.0 / math.sqrt(0.02))
    assert (d.separated, d.ranges_overlap, d.wins, d.paired) == (True, False, 2, 2)
    # ranges overlap ([1.0, 2.0] and [1.4, 1.6]): not outside the noise, whatever the t
    d = difference("a", "b", {0: 1.0, 1: 2.0}, {0: 1.4, 1: 1.6})
    assert d.ranges_overlap and not d.separated and d.wins == 1
    # disjoint ranges but within 2 se: not separated either (means 0 and 1.1, se 0.707)
    d = difference("a", "b", {0: -0.5, 1: 0.5}, {0: 0.6, 1: 1.6})
    assert not d.ranges_overlap and abs(d.diff) < 2 * d.se and not d.separated
    # one seed: nothing is called real
    assert not difference("a", "b", {0: 2.0}, {0: 1.0}).separated


def test_size_warnings_name_the_quantity_and_both_models() -> None:
    rows = [{"label": "a", "stored_params": 1000, "active_params": 1000,
             "flops_per_token": 2000.0, "step_seconds": 0.010},
            {"label": "b", "stored_params": 1040, "active_params": 1100,
             "flops_per_token": 2000.0, "step_seconds": 0.0101}]
    w = size_warnings(rows, 0.05)
    assert len(w) == 1 and w[0].startswith("active parameters per token differ by 10.0% (b 1.1k vs a 1k)")
    assert "not at equal parameters" in w[0]
    assert size_warnings(rows, 0.10) == []
    rows[1]["step_seconds"] = 0.02
    assert any(x.startswith("measured step time differ by 100.0% (b 20 ms vs a 10 ms)")
               for x in size_warnings(rows, 0.05))


# ----------------------------------------------------------------- real comparisons


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One uninterrupted comparison through the CLI, in this process; its stdout."""
    out = tmp_path_factory.mktemp("cmp") / "pair"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["compare", PAIR, *ARGS, "--out", str(out)]) == 0
    return out, buf.getvalue()


def _per_seed(out: Path) -> dict[str, dict[str, float]]:
    res = json.loads((out / "results.json").read_text())
    return {e["label"]: e["val_loss_per_seed"] for e in res["entrants"]}


def test_outputs_are_written(done: tuple[Path, str]) -> None:
    out, table = done
    res = json.loads((out / "results.json").read_text())
    assert res["budget"] == {"kind": "steps", "value": 20} and res["seeds"] == [0, 1]
    assert res["complete"] and [e["label"] for e in res["entrants"]] == ["narrow", "wide"]
    for e in res["entrants"]:
        assert e["runs"] == 2 and e["steps"] == [20]
        assert e["val_loss"]["n"] == 2 and 3.0 < e["val_loss"]["mean"] < 5.6
        assert e["step_seconds"] > 0 and e["tokens_per_s"] > 0
        assert e["val_bpb"]["n"] == 2  # byte-level text: bits per byte too
    assert res["entrants"][0]["stored_params"] == 24_736  # what `blockdsl check` says
    assert res["entrants"][1]["stored_params"] == 32_928
    (pair,) = res["differences"]
    assert (pair["a"], pair["b"], pair["paired"]) == ("narrow", "wide", 2)
    vals = _per_seed(out)
    assert pair["diff"] == pytest.approx(
        (sum(vals["wide"].values()) - sum(vals["narrow"].values())) / 2)
    # the size mismatch (33.1% in stored params) is reported, in the file and the table
    assert any(w.startswith("stored parameters differ by 33.1% (wide 32.9k vs narrow 24.7k)")
               for w in res["warnings"])
    assert "warning: stored parameters differ by 33.1%" in table
    assert "narrow" in table and "wide" in table and "(reference)" in table
    for name in ("loss.png", "summary.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for label in ("narrow", "wide"):
        evals = json.loads((out / "runs" / label / "seed-1" / "result.json").read_text())["evals"]
        assert [e["step"] for e in evals] == [0, 10, 20]


def test_kill_and_resume_loses_no_finished_run(done: tuple[Path, str], tmp_path: Path) -> None:
    """SIGKILL a real `blockdsl compare` once a run has finished and another is mid-run
    (checkpointed, not finished); the same command then keeps the finished runs' files
    untouched, resumes the killed one from its checkpoint, and reproduces every number."""
    out = tmp_path / "pair"
    cmd = [sys.executable, "-m", "blockdsl.cli", "compare", PAIR, *ARGS, "--out", str(out),
           "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        folders = list((out / "runs").glob("*/seed-*"))
        finished = [f for f in folders if (f / "result.json").is_file()]
        midway = [f for f in folders if (f / "latest").exists() and f not in finished]
        if finished and midway:
            os.kill(proc.pid, signal.SIGKILL)
            killed = midway[0]
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed is not None, f"the comparison ended before it could be killed: {proc.returncode}"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    kept = {f: ((f / "result.json").read_bytes(), (f / "result.json").stat().st_mtime_ns)
            for f in finished}
    again = subprocess.run(cmd[:-1], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert f"{len(finished)} finished run(s) kept" in again.stderr
    for f, (data, mtime) in kept.items():
        assert (f / "result.json").read_bytes() == data
        assert (f / "result.json").stat().st_mtime_ns == mtime
    assert json.loads((killed / "result.json").read_text())["resumed"] is True
    assert _per_seed(out) == _per_seed(done[0])  # reproducible from the seeds, kill or not


# ----------------------------------------------------------------- mistakes


def _err(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["compare", *args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    return err


def test_bad_input_is_a_one_line_error(done: tuple[Path, str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    gpt = str(ROOT / "specs/tiny/gpt.block")
    assert "needs at least two models" in _err([gpt, "--out", str(tmp_path / "a")], capsys)
    assert "no such spec file: nope.block" in _err(["nope.block", gpt], capsys)
    err = _err([PAIR, "--model", "narrow", "--model", "tall", "--out", str(tmp_path / "b")], capsys)
    assert "--model tall: no such model" in err and "narrow, wide" in err
    err = _err([PAIR, gpt, str(ROOT / "specs/tiny/vit.block"), "--out", str(tmp_path / "c")], capsys)
    assert "do not share a task" in err
    # the finished comparison's folder, asked to hold a different one
    err = _err([PAIR, *ARGS, "--lr", "0.01", "--out", str(done[0])], capsys)
    assert "holds a different comparison (lr was 0.002, now 0.01)" in err
    with pytest.raises(SystemExit) as exc:
        main(["compare", PAIR, "--seeds", "0"])
    assert exc.value.code == 1 and "--seeds: expected an integer > 0" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_compile_choice_reaches_every_run_and_pins_the_comparison(tmp_path: Path) -> None:
    """`--no-compile` is what each run's TrainConfig gets and what compare.json pins (a
    resume with another choice would mix numbers); left unset, comparisons written before
    the flag existed still resume (their identity has no such key)."""
    from blockdsl.compare.setup import CompareConfig

    assert "compile" not in CompareConfig(steps=2).identity()
    assert CompareConfig(steps=2, compile=True).identity()["compile"] is True
    out = tmp_path / "c"
    assert main(["compare", PAIR, "--steps", "2", "--seeds", "1",
                 "--eval-every", "2", "--eval-batches", "1", "--timing-steps", "1",
                 "--no-compile", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "compare.json").read_text())["identity"]["compile"] is False
    import torch

    for label in ("narrow", "wide"):  # the config each run trained with, in its checkpoint
        (ckpt,) = (out / "runs" / label / "seed-0").glob("ckpt-*")
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
        assert state["config"]["compile"] is False
