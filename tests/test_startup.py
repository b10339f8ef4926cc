"""`blockdsl check` stays instant: assert on what a cold run imports and builds, not on time.

Wall time is measured by benchmarks/frontend.py (target < 0.3 s per seed spec); these
tests pin the causes, so a regression names the import that brought it back.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEEDS = sorted((ROOT / "specs").glob("*.block"))

# Run `blockdsl check` as the console script does (argv from sys.argv), then report.
_PROBE = """
import sys
sys.argv = ["blockdsl", "check", sys.argv[1]]
from blockdsl.cli import main
rc = main()
modules = sorted(sys.modules)
blocked = "regex" in sys.modules and sys.modules["regex"] is None
import json
from pydantic import BaseModel
from blockdsl.lang import ir
built = sorted(n for n, c in vars(ir).items()
               if isinstance(c, type) and issubclass(c, BaseModel) and c.__pydantic_complete__)
print(json.dumps({"rc": rc, "modules": modules, "built": built, "regex_blocked": blocked}))
"""

# Not needed to parse, resolve and count a spec. torch/numpy/networkx/rich/optuna belong
# to lowering, training, graphs and tables; importlib.metadata comes with pydantic's
# plugin discovery (run when a schema is built); difflib only names near misses in
# errors; the train/search subcommands register only when one of them may be run; lark
# would import the optional `regex` module, which our grammar does not need.
FORBIDDEN = (
    "torch", "numpy", "networkx", "rich", "optuna", "matplotlib", "regex",
    "importlib.metadata", "pydantic.plugin._loader", "difflib", "json.decoder",
    "blockdsl.cli.train", "blockdsl.cli.search", "blockdsl.lower", "blockdsl.nn",
)


def probe(spec: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", _PROBE, str(spec)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", SEEDS, ids=lambda p: p.name)
def test_check_imports_only_the_front_end(spec: Path) -> None:
    out = probe(spec)
    assert out["rc"] == 0
    heavy = [m for m in out["modules"] if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert heavy == []
    # IR schemas are deferred: the parser uses model_construct, nothing validates.
    assert out["built"] == []
    # `regex` is hidden from lark's import only: a later `import regex` still works.
    assert not out["regex_blocked"]


def test_help_still_lists_every_subcommand() -> None:
    p = subprocess.run([sys.executable, "-m", "blockdsl.cli", "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    for cmd in ("check", "compile", "train", "search"):
        assert cmd in p.stdout
