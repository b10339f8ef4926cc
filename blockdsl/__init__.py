"""blockdsl: compose, compile and search transformer block architectures.

    import blockdsl
    spec = blockdsl.load("specs/gpt2-small.block")    # IR (pydantic, no torch)
    plan = blockdsl.resolve(spec)                      # concrete layer instances
    rep = blockdsl.report(plan)                        # params / FLOPs, no torch
    model = blockdsl.build(plan)                       # torch nn.Module
    model = blockdsl.load_run("runs/gpt_tiny")         # a trained run, weights loaded

Every function also accepts a path or .block text where it needs a spec. Importing this
package does not import torch; only `build` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockdsl.lang.errors import BlockError
from blockdsl.lang.ir import Module
from blockdsl.lang.resolve import resolve as _resolve  # `blockdsl.lang.parse` (lark): on first use
from blockdsl.plan import Plan
from blockdsl.version import __version__

if TYPE_CHECKING:
    from blockdsl.graph import Report
    from blockdsl.nn.model import BlockModel

__all__ = ["BlockError", "load", "resolve", "report", "build", "check", "load_run",
           "__version__"]


def load(source: str | Path) -> Module:
    """Parse a .block file (path) or .block text into the IR, includes resolved."""
    from blockdsl.lang.parse import load_module

    return load_module(source)


def resolve(
    spec: str | Path | Module | Plan,
    model: str | None = None,
    assignment: dict[str, Any] | None = None,
) -> Plan:
    """Resolve a spec's model (default: the last one the file defines) to a Plan."""
    if isinstance(spec, Plan):
        return spec
    module = spec if isinstance(spec, Module) else load(spec)
    return _resolve(module, model, assignment)


def check(spec: str | Path | Module | Plan, model: str | None = None) -> Plan:
    """Parse, resolve and validate; raises `BlockError` with a located message."""
    return resolve(spec, model)


def report(spec: str | Path | Module | Plan, model: str | None = None) -> Report:
    """Parameter and FLOP accounting from the Plan alone (no torch)."""
    from blockdsl.graph import report as _report

    return _report(resolve(spec, model))


def build(
    spec: str | Path | Module | Plan,
    model: str | None = None,
    device: Any = None,
    precision: str = "fp32",
    batch: int | None = None,
) -> BlockModel:
    """Lower a spec to a torch module (`BlockModel`), on CUDA when present by default.

    `batch` (sequences or images per step) picks the kernels `compile --tune` measured at
    the nearest token count, when it measured more than one.
    """
    from blockdsl.lower import build_from_plan

    return build_from_plan(resolve(spec, model), device=device, precision=precision, batch=batch)


def load_run(path: str | Path, device: Any = "cpu", precision: str = "fp32") -> BlockModel:
    """Rebuild the model a run folder (or one of its `ckpt-<step>` folders) trained, from
    the spec its checkpoint records, with its weights; in eval mode. Errors are one-line
    `RunError`s naming what is missing."""
    from blockdsl.runs import load_run as _load_run

    return _load_run(path, device=device, precision=precision)
