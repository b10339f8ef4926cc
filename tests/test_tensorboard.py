"""`--tensorboard`: event files beside metrics.jsonl, read back with TensorBoard's own
EventAccumulator and compared scalar by scalar with the metrics file."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from blockdsl.cli import main
from blockdsl.train.tblog import scalars

ROOT = Path(__file__).resolve().parent.parent
TINY_GPT = ROOT / "specs" / "tiny" / "gpt.block"
FAST = ["--batch-size", "4", "--eval-every", "10", "--eval-batches", "2", "--quiet"]


def events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def expected(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    want: dict[str, list[tuple[int, float]]] = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        for tag, v in scalars(rec):
            want.setdefault(tag, []).append((rec["step"], v))
    return want


def assert_same(got: dict[str, list[tuple[int, float]]],
                want: dict[str, list[tuple[int, float]]]) -> None:
    assert sorted(got) == sorted(want)
    for tag, rows in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in rows], tag  # each step once, in order
        for (_, g), (_, w) in zip(got[tag], rows):
            assert g == pytest.approx(w, rel=1e-6, abs=1e-30), tag  # event files hold float32


def test_scalars_rule() -> None:
    rec = {"kind": "train", "step": 10, "loss": 2.5, "lr": 1e-3, "grad_norm": None,
           "aux/balance": 0.01, "flag": True, "note": "x", "bad": float("nan")}
    assert scalars(rec) == [("train/loss", 2.5), ("train/lr", 1e-3), ("train/aux/balance", 0.01)]
    assert scalars({"step": 3, "loss": 1.0}) == []  # no kind: not a metrics row


def test_each_row_is_on_disk_before_close(tmp_path: Path) -> None:
    """What a kill -9 would leave: rows logged so far are readable with the writer open."""
    from blockdsl.train.tblog import Writer

    w = Writer(tmp_path / "tb")
    try:
        for step in range(3):
            w.log({"kind": "train", "step": step, "loss": 1.0 / (step + 1)})
        assert events(tmp_path / "tb") == {"train/loss": [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]}
    finally:
        w.close()


def test_train_tensorboard_matches_metrics_jsonl(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = main(["train", str(TINY_GPT), "--steps", "20", "--out", str(out), "--tensorboard", *FAST])
    assert rc == 0, capsys.readouterr().err
    got, want = events(out / "tb"), expected(out / "metrics.jsonl")
    for tag in ("train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm",
                "eval/val_loss", "eval/val_bpb", "summary/val_loss"):
        assert tag in got, tag
    assert [s for s, _ in got["eval/val_loss"]] == [0, 10, 20]
    assert_same(got, want)


def test_resumed_run_shows_each_step_once(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A run resumed from step 10 after it had logged to 20: TensorBoard hides the first
    attempt's steps after the checkpoint (purge_step), as metrics.jsonl drops those rows,
    so both show the redone steps once and with the same values (train_seconds and
    tokens/s differ between the attempts, so a leftover event would not match)."""
    out = tmp_path / "run"
    args = ["train", str(TINY_GPT), "--steps", "20", "--out", str(out), "--tensorboard", *FAST]
    assert main(args + ["--ckpt-every", "10"]) == 0
    (out / "latest").unlink()  # the newest checkpoint lost: resume falls back to step 10
    shutil.rmtree(out / "ckpt-00000020")
    assert main(args + ["--resume"]) == 0
    capsys.readouterr()
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2
    assert_same(events(out / "tb"), expected(out / "metrics.jsonl"))


def test_missing_tensorboard_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Without the package (made unimportable in a child process) the flag is refused
    before anything is trained or written, naming the install command."""
    code = (
        "import sys; sys.modules['tensorboard'] = None\n"  # `import tensorboard` now fails
        "from blockdsl.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    for cmd in (["train", str(TINY_GPT), "--steps", "5", "--out", str(tmp_path / "run"),
                 "--tensorboard", "--quiet"],
                ["search", str(ROOT / "search" / "brainformer.block"), "--budget", "1",
                 "--out", str(tmp_path / "study"), "--storage", str(tmp_path / "s.journal"),
                 "--tensorboard", "--no-live"]):
        p = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                           cwd=tmp_path, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert "tensorboard" in lines[0] and "pip install" in lines[0], lines[0]
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
        assert not (tmp_path / "s.journal").exists()


SPACE = """
model dense {
  d = 32
  stem tokens(vocab=256, context=32, pos=learned)
  head lm(tie=true)
  block cell {
    s0 mha(heads=2, bias=false) norm=pre
    s1 mlp(d_ff=64, act=gelu, bias=false) norm=pre
  }
  repeat 2 cell
}
space tiny extends dense {
  block cell {
    slots 2 of {mha(heads={2 | 4}, bias=false) | mlp(d_ff=64, act=gelu, bias=false)} norm=pre
  }
  baseline dense
  minimize val_loss
  budget search(trials=3, seconds=1, batch_size=8, eval_batches=2, prune_startup=9)
}
"""


def test_search_writes_one_run_per_trial(tmp_path: Path) -> None:
    import optuna

    from blockdsl import search as S

    space = tmp_path / "tiny.block"
    space.write_text(SPACE)
    journal = tmp_path / "tb.journal"
    p = subprocess.run(
        [sys.executable, "-m", "blockdsl.cli", "search", str(space), "--study", "tbs",
         "--storage", str(journal), "--out", str(tmp_path / "study"), "--tensorboard",
         "--no-live", "--json", "--threads", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert p.returncode == 0, p.stderr
    S.quiet_optuna()
    study = optuna.load_study(study_name="tbs", storage=S.open_storage(str(journal), "tbs"))
    trained = [t for t in study.get_trials()
               if t.user_attrs.get("status") in ("trained", "pruned")]
    assert trained
    runs = sorted(d.name for d in (tmp_path / "study" / "tb").iterdir())
    assert runs == [f"trial-{t.number:04d}" for t in trained]
    for t in trained:
        got = events(tmp_path / "study" / "tb" / f"trial-{t.number:04d}")
        val = dict(got["eval/val_loss"])
        assert 0 in val and len(val) >= 2  # step 0 and at least the final evaluation
        # the rung values the pruner saw are the logged validation losses at those steps
        for v in (t.user_attrs.get("rungs") or {}).values():
            assert any(math.isclose(v, x, rel_tol=1e-6) for x in val.values())
        if t.user_attrs["status"] == "trained":
            final = max(val)
            assert t.values[0] == pytest.approx(val[final], rel=1e-6)
        assert {"train/loss", "train/lr", "train/tokens_per_s"} <= set(got)
