"""A non-editable install carries what the CLI needs: the grammar and the search spaces."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_grammar_and_search_spaces(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("blockdsl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "blockdsl/lang/grammar.lark" in names
    # Every module of every subpackage (pyproject lists the packages by name).
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "blockdsl").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    spaces = {p.name for p in (REPO / "search").glob("*.block")}
    assert spaces and {f"blockdsl/spaces/{n}" for n in spaces} <= names
    # Installed without the repository beside it, the default space resolves to the copy.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "-t", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    out = subprocess.run(
        [sys.executable, "-c", "import blockdsl.search as S; print(S.default_space_path())"],
        cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout.strip()
    assert Path(out) == target / "blockdsl" / "spaces" / "brainformer.block"
