"""The layout's rules, read off the code (docs/architecture.md states them):

- the language, the Plan, the primitive registry and the report never import torch, so
  `blockdsl check` stays instant (checked by importing them in a fresh interpreter);
- `nn` (plain PyTorch modules) never imports the language;
- nothing outside `blockdsl.cli` imports it;
- stages import downwards only: no module-level import cycle, and none of lang/plan/
  primitives/graph/lower/train reaches up into search or cli;
- no module over 500 lines and no function over 100, unless its docstring says why
  (a paragraph starting "Why one file:" / "Why one function:").
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "blockdsl"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 100


def _name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, module_level: bool) -> set[str]:
    """blockdsl modules that `name` imports: at module level only (what runs on import),
    or anywhere in the file (lazy imports inside functions too). Type-only imports under
    `if TYPE_CHECKING:` do not count: they never run."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit_one(c)
                continue
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            visit_one(child)

    def visit_one(child: ast.AST) -> None:
        if isinstance(child, ast.Import):
            for a in child.names:
                found.add(a.name)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                up = pkg.split(".")
                up = up[: len(up) - (child.level - 1)]
                base = ".".join(up + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in child.names} & MODULES.keys()
            # `from blockdsl.lang import ir` depends on the submodule, not on the package
            # (whose `__init__` runs first, but as any package's does).
            found.update(subs if len(subs) == len(child.names) else subs | {base})
        visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


TORCH_FREE = [m for m in MODULES if _under(
    m, "blockdsl.lang", "blockdsl.plan", "blockdsl.names", "blockdsl.taskio", "blockdsl.version",
    "blockdsl.files", "blockdsl.exits", "blockdsl.primitives", "blockdsl.graph", "blockdsl.picture")]

# The stages from the bottom up: a module may import its own stage's modules and any lower
# stage's, never a higher one's (lazy imports inside functions included). `blockdsl` is the
# package root, the public facade over lang, report and lower.
STAGES: list[tuple[str, ...]] = [
    ("blockdsl.names", "blockdsl.taskio", "blockdsl.version", "blockdsl.files"),
    ("blockdsl.plan",),
    ("blockdsl.nn",),  # plain modules: the registry's builders import them when called
    ("blockdsl.primitives",),
    ("blockdsl.lang", "blockdsl.exits"),
    ("blockdsl.graph", "blockdsl.picture"),
    ("blockdsl.device", "blockdsl.tuning_cache"),
    ("blockdsl.lower",),
    ("blockdsl",),
    ("blockdsl.train",),
    ("blockdsl.tune",),  # races whole models through the training step
    ("blockdsl.compile",),
    ("blockdsl.export",),  # builds, loads runs (train's checkpoints), writes other formats
    ("blockdsl.search",),
    ("blockdsl.compare",),  # reuses the search's paired step timing
    ("blockdsl.cli",),
]


def _stage(name: str) -> int:
    """The stage of a module: that of the longest prefix the table names."""
    best = max(((len(p), i) for i, stage in enumerate(STAGES) for p in stage
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"{name} is in no stage of STAGES: add it"
    return best[1]


def test_the_front_end_never_imports_torch() -> None:
    assert "blockdsl.lang.resolve" in TORCH_FREE and "blockdsl.primitives" in TORCH_FREE
    code = ("import importlib, sys\n"
            f"for m in {TORCH_FREE!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k == 'torch' or k.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_nn_never_imports_the_language() -> None:
    bad = {m: sorted(i for i in _imports(m, module_level=False)
                     if _under(i, "blockdsl.lang", "blockdsl.plan", "blockdsl.search",
                               "blockdsl.train", "blockdsl.cli"))
           for m in MODULES if _under(m, "blockdsl.nn")}
    assert {m: v for m, v in bad.items() if v} == {}


def test_nothing_imports_the_cli() -> None:
    bad = {m: sorted(i for i in _imports(m, module_level=False) if _under(i, "blockdsl.cli"))
           for m in MODULES if not _under(m, "blockdsl.cli")}
    assert {m: v for m, v in bad.items() if v} == {}


def test_every_import_points_down_the_stages() -> None:
    """cli -> search -> compile -> tune -> train -> lower -> report -> lang -> registry -> nn
    -> plan -> names: an import may stay within its stage or go down, never up."""
    up = sorted(f"{m} -> {i}" for m in MODULES for i in _imports(m, module_level=False)
                if _stage(i) > _stage(m))
    assert up == []


def test_lower_stages_do_not_reach_up() -> None:
    """lang/plan/primitives/graph/lower/nn/train never import search (nor, above, cli)."""
    low = [m for m in MODULES if _under(m, "blockdsl.lang", "blockdsl.plan", "blockdsl.primitives",
                                         "blockdsl.graph", "blockdsl.lower", "blockdsl.nn",
                                         "blockdsl.train", "blockdsl.names")]
    bad = {m: sorted(i for i in _imports(m, module_level=False) if _under(i, "blockdsl.search"))
           for m in low}
    assert {m: v for m, v in bad.items() if v} == {}
    lang = [m for m in MODULES if _under(m, "blockdsl.lang", "blockdsl.plan")]
    bad = {m: sorted(i for i in _imports(m, module_level=False)
                     if _under(i, "blockdsl.lower", "blockdsl.nn", "blockdsl.train", "blockdsl.tune"))
           for m in lang}
    assert {m: v for m, v in bad.items() if v} == {}


@pytest.mark.parametrize("module_level", [True, False], ids=["on-import", "with-lazy-imports"])
def test_no_import_cycle(module_level: bool) -> None:
    """No cycle among imports, neither those that run when a module is imported nor with
    the lazy ones inside functions added (a lazy import is a way to defer a cost, not to
    hide a two-way dependency). A package's `__init__` importing its own submodules is
    not a cycle of the design, so an edge from a package to its submodule is left out."""
    graph = {m: {i for i in _imports(m, module_level=module_level)
                 if not i.startswith(m + ".")} for m in MODULES}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                dfs(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [])
    assert cycles == []


def _says_why(node: ast.AST, marker: str) -> bool:
    doc = ast.get_docstring(node) or ""  # type: ignore[arg-type]
    return marker in doc


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_function_sizes(name: str) -> None:
    path = MODULES[name]
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES or _says_why(tree, "Why one file:"), (
        f"{path.relative_to(PKG.parent)} has {lines} lines")
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
            and not _says_why(n, "Why one function:")]
    assert long == []
