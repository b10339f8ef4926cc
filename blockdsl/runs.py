"""What makes a run folder self-describing, and `blockdsl.load_run(DIR)` that reads it.

A run folder (what `blockdsl train --out` writes) holds `ckpt-<step>/` folders and
`latest`. Each checkpoint's `model.safetensors` carries, in its header metadata, the
resolved spec (standalone `.block` text, `lang/render.py`) and blockdsl's version, and
`resolved.block` lies beside it and in the run folder. So a checkpoint is rebuilt from
its folder alone, and a weights file copied out of its folder still says what it is.

Why a module of the package root and not of `train/`: `blockdsl.load_run` is public API
beside `blockdsl.build`, and the root sits below training in the stages (training
imports it); `train/checkpoint.py` writes with the names and helpers defined here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"
RESOLVED = "resolved.block"  # the spec a checkpoint's weights fit, standalone
SPEC_KEY = "blockdsl_resolved_block"  # ... and the same text in the weights' metadata
_CKPT = re.compile(r"ckpt-(\d+)")


class RunError(ValueError):
    """A folder that does not hold a loadable run; the message says what is missing."""

    @property
    def cli_message(self) -> str:
        return str(self)


def resolved_spec(model: Any) -> str | None:
    """The standalone `.block` text of the Plan `model` was built from (None: not built by
    blockdsl's lowering, e.g. a hand-assembled module). A wrapper (DDP, torch.compile)
    is looked through."""
    from blockdsl.lang.render import render

    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        plan = getattr(m, "plan", None)
        if plan is not None:
            return render(plan)
    return None


def weights_metadata(spec: str | None) -> dict[str, str]:
    """safetensors header metadata: the format, blockdsl's version and the resolved spec."""
    from blockdsl.version import __version__

    meta = {"format": "pt", "blockdsl_version": __version__}
    if spec is not None:
        meta[SPEC_KEY] = spec
    return meta


def find_weights(path: str | Path) -> Path:
    """The checkpoint folder `path` names: itself when it holds model.safetensors, else
    the `ckpt-<step>` folder its `latest` names (only a plain file naming a folder
    directly inside), else its newest `ckpt-<step>` folder holding weights."""
    p = Path(path)
    if not p.is_dir():
        raise RunError(f"{p} is not a folder (expected a run folder or a checkpoint folder)")
    if (p / WEIGHTS).is_file():
        return p
    ckpts = sorted((int(m.group(1)), c) for c in p.iterdir()
                   if (m := _CKPT.fullmatch(c.name)) and c.is_dir() and not c.is_symlink()
                   and (c / WEIGHTS).is_file())
    latest = p / "latest"
    if latest.is_file() and not latest.is_symlink():
        with latest.open("rb") as f:
            name = f.read(256).decode("utf-8", "replace").strip()
        named = [c for _, c in ckpts if c.name == name]
        if named:
            return named[0]
    if not ckpts:
        raise RunError(f"{p} holds no {WEIGHTS} and no ckpt-<step> folder with one: is it "
                       "a run folder written by `blockdsl train`?")
    return ckpts[-1][1]


def read_spec(folder: Path) -> tuple[str, dict[str, str]]:
    """(resolved .block text, the weights' metadata) of a checkpoint folder."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # a damaged header: safetensors raises its own error types
        raise RunError(f"{folder / WEIGHTS} is not a readable safetensors file: {e}") from None
    spec = meta.get(SPEC_KEY)
    if spec is None and (folder / RESOLVED).is_file():
        spec = (folder / RESOLVED).read_text()
    if spec is None:
        raise RunError(f"{folder} does not say which model its weights are for (no spec in "
                       f"{WEIGHTS}'s metadata, no {RESOLVED}): it was written before "
                       "blockdsl recorded it; rebuild with blockdsl.build(SPEC) and load "
                       "the weights into that")
    return spec, meta


def _check_digest(folder: Path) -> None:
    """A checkpoint's meta.json records its files' sha256: a damaged file is named."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return
    try:
        digest = json.loads(meta_path.read_text())["files"][WEIGHTS]
    except (ValueError, KeyError, TypeError):
        raise RunError(f"{meta_path} is damaged (no sha256 of {WEIGHTS})") from None
    h = hashlib.sha256()
    with (folder / WEIGHTS).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != digest:
        raise RunError(f"{folder / WEIGHTS} does not match its recorded sha256 (damaged)")


def load_run(path: str | Path, device: Any = "cpu", precision: str = "fp32") -> Any:
    """The model a run (or checkpoint, or export) folder holds: built from its recorded
    spec, its weights loaded (every parameter, or a RunError), in eval mode."""
    import torch
    from safetensors.torch import load_model

    from blockdsl.lang.parse import load_module
    from blockdsl.lang.resolve import resolve
    from blockdsl.lower import build_from_plan

    folder = find_weights(path)
    spec, _ = read_spec(folder)
    _check_digest(folder)
    # what blockdsl.build does, from the stages below (this module sits under the package face)
    plan = resolve(load_module(spec), None, None)
    model = build_from_plan(plan, device=device, precision=precision)
    try:
        load_model(model, str(folder / WEIGHTS), strict=True, device=str(torch.device(device)))
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        raise RunError(f"{folder / WEIGHTS} does not fit its recorded spec: {reason}") from None
    return model.eval()
