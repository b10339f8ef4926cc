"""The command line: `check` (instant, no torch) and `compile` (--json, --out, --smoke)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import blockdsl
from blockdsl.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY_GPT = ROOT / "specs" / "tiny" / "gpt.block"
SHARED = ROOT / "tests" / "specs" / "shared_ffn.block"


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_check_and_compile_json_import_no_torch(tmp_path: Path) -> None:
    script = (
        "import sys, io, contextlib\n"
        "from blockdsl.cli import main\n"
        f"rc = main(['check', {str(SHARED)!r}])\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    rc2 = main(['compile', {str(TINY_GPT)!r}, '--json', '--out', {str(tmp_path)!r}])\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'optuna', 'matplotlib') if m in sys.modules)\n"
        "print('RC', rc, rc2, 'HEAVY', ','.join(heavy) or '-')\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith(f"ok: {SHARED}: model shared_ffn:")
    assert lines[-1] == "RC 0 0 HEAVY -", lines[-1]


def test_check_prints_ok_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "check", str(SHARED))
    assert rc == 0 and err == ""
    rep = blockdsl.report(SHARED)
    assert out.startswith(f"ok: {SHARED}: model shared_ffn: 6 sublayers in 3 blocks, 2 shared groups;")
    assert f"{rep.stored_params:,} stored params" in out
    assert out.count("\n") == 1


def test_check_picks_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main(capsys, "check", str(ROOT / "tests" / "specs" / "derived.block"),
                          "--model", "base")
    assert rc == 0 and "model base:" in out


def test_compile_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "compile", str(TINY_GPT), "--json", "--out", str(tmp_path))
    assert rc == 0, err
    summary = json.loads(out)  # exactly one JSON object, nothing else on stdout
    assert isinstance(summary, dict)
    rep = blockdsl.report(TINY_GPT)
    assert summary["stored_params"] == rep.stored_params == 824_448
    assert summary["active_params_per_token"] == rep.active_params_per_token
    assert summary["flops_per_token"] == pytest.approx(rep.flops_per_token)
    assert isinstance(summary["flops_per_token"], float)


def test_compile_out_writes_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "shared_ffn"  # --out names the artifact folder itself
    rc, out, err = run_main(capsys, "compile", str(SHARED), "--out", str(d))
    assert rc == 0, err
    assert "stored parameters" in out  # the human-readable table
    assert sorted(p.name for p in d.iterdir()) == ["graph.svg", "resolved.block", "summary.json"]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["stored_params"] == blockdsl.report(SHARED).stored_params
    assert summary["artifacts"]["resolved_spec"] == str(d / "resolved.block")
    svg = (d / "graph.svg").read_text()
    assert "<svg" in svg and svg.rstrip().endswith("</svg>")
    # the resolved spec stands alone and compiles to the same numbers
    again = blockdsl.report(d / "resolved.block")
    assert again.stored_params == summary["stored_params"]
    assert again.flops_per_token == pytest.approx(summary["flops_per_token"])


def test_compile_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "compile", str(TINY_GPT), "--smoke", "--json", "--device",
                            "cpu", "--seq", "32", "--out", str(tmp_path))
    assert rc == 0, err
    assert "Traceback" not in err
    summary = json.loads(out)
    smoke = summary["smoke"]
    assert smoke["finite"] is True
    assert smoke["module_params"] == summary["stored_params"] == 824_448
    assert math.isfinite(smoke["loss"])
    assert smoke["params_without_grad"] == []
    assert smoke["input_shape"] == [2, 32]


def test_compile_smoke_refuses_a_seq_beyond_the_context(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """As `train --seq` does: shortening it silently would smoke-test another shape."""
    rc, _, err = run_main(capsys, "compile", str(TINY_GPT), "--smoke", "--device", "cpu",
                          "--seq", "100000", "--out", str(tmp_path))
    assert rc == 1 and "Traceback" not in err
    assert "gpt.block:3:1: error: --seq 100000 is outside model gpt_tiny's context of 128" in err
    assert "hint: use --seq between 1 and 128" in err
    assert not list(tmp_path.iterdir())  # refused before any artifact is written


@pytest.mark.parametrize("flag,value", [("--batch", "-3"), ("--batch", "0"), ("--seq", "x")])
def test_compile_rejects_non_positive_sizes(flag: str, value: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["compile", str(TINY_GPT), "--tune", flag, value])
    assert exc.value.code == 1  # a user mistake; 2 is kept for internal errors
    assert f"argument {flag}: expected a positive integer, got" in capsys.readouterr().err
