"""Checkpoint folders: written atomically, verified by sha256, `latest` never followed blindly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blockdsl import files as fileio
from blockdsl.runs import RESOLVED, resolved_spec, weights_metadata
from blockdsl.train.config import TrainError

CKPT_PREFIX = "ckpt-"
LATEST = "latest"
_CKPT_NAME = re.compile(re.escape(CKPT_PREFIX) + r"(\d+)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write out/ckpt-<step>/ atomically, then point out/latest at it; prune old ones.

    Weights go through `safetensors.torch.save_model`, which stores a shared (tied)
    parameter once, with the resolved spec and blockdsl's version in its metadata (also
    written as resolved.block in the folder and in `out`); optimizer, schedule, RNG and data position go in train_state.pt;
    meta.json records the files' sha256 so a damaged checkpoint is named, not half-loaded.
    """
    from safetensors.torch import save_model

    final = out / f"{CKPT_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-ckpt-"))
    try:
        # mkdtemp makes it 0700; a checkpoint folder gets a plain mkdir's mode (the umask's)
        os.chmod(tmp, 0o777 & ~fileio.umask())
        spec = resolved_spec(model)
        save_model(model, str(tmp / "model.safetensors"), metadata=weights_metadata(spec))
        if spec is not None:
            (tmp / RESOLVED).write_text(spec)
        payload = {"optimizer": optimizer.state_dict(), "rng": _rng_state(), **state}
        torch.save(payload, tmp / "train_state.pt")
        meta = {
            "step": step,
            "files": {f.name: _sha256(f) for f in sorted(tmp.iterdir())},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():  # safetensors writes its file 0600 whatever the umask
            os.chmod(f, 0o666 & ~fileio.umask())
        if final.exists():
            # a folder of this step from a lost tail (e.g. a damaged checkpoint newer than
            # the one a run resumed from): this run's state replaces it, never the reverse
            stale = Path(tempfile.mkdtemp(dir=out, prefix=".old-ckpt-"))
            os.replace(final, stale / final.name)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fileio.atomic_write(out / LATEST, final.name.encode())
    if spec is not None:  # the run folder names its model beside its checkpoints too
        fileio.atomic_write(out / RESOLVED, spec.encode())
    ckpts = sorted(p for p in out.glob(f"{CKPT_PREFIX}*") if p.is_dir())
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The folder out/latest names, or None when there is no `latest` file.

    `latest` is data, maybe damaged or hostile: it must name a `ckpt-<step>` folder
    directly inside `out` (after resolving symlinks), or this raises a TrainError rather
    than follow it (`../../../../etc` would otherwise be loaded, and later pruned).
    Only its first 256 bytes are read.
    """
    pointer = out / LATEST
    if not (pointer.exists() or pointer.is_symlink()):
        return None
    if pointer.is_symlink() or not pointer.is_file():
        # blockdsl writes `latest` as a small regular file; a link may lead to any file,
        # whose bytes would then be quoted below
        raise TrainError(f"{pointer} is not a regular file: remove it, or resume from a "
                         f"{CKPT_PREFIX}<step> folder by deleting it")
    try:
        with pointer.open("rb") as f:
            name = f.read(256).decode("utf-8", "replace").strip()
    except OSError as e:
        raise TrainError(f"cannot read {pointer}: {e.strerror or e}") from None
    path = out / name
    inside = False
    with contextlib.suppress(OSError, RuntimeError, ValueError):  # ValueError: a NUL byte
        inside = path.resolve().parent == out.resolve()
    if not (_CKPT_NAME.fullmatch(name) and inside):
        # quoted only when it reads as a name: never a damaged file's bytes
        shown = repr(name[:80]) if name.isascii() and name.isprintable() else "something"
        raise TrainError(f"{pointer} names {shown}, not a {CKPT_PREFIX}<step> folder inside "
                         f"{out}: refusing to follow it; delete {pointer} to resume from the "
                         "newest checkpoint that loads")
    return path


def checkpoint_folders(out: Path) -> list[Path]:
    """The `ckpt-<step>` folders directly inside `out` (no symlink leading out), newest first."""
    found = []
    with contextlib.suppress(OSError):
        root = out.resolve()
        for p in out.iterdir():
            m = _CKPT_NAME.fullmatch(p.name)
            with contextlib.suppress(OSError, RuntimeError):
                if m and p.is_dir() and p.resolve().parent == root:
                    found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Verify and load a checkpoint folder; any damage becomes a one-line TrainError."""
    from safetensors.torch import load_model

    try:
        meta = json.loads((path / "meta.json").read_text())
        for name, digest in meta["files"].items():
            if _sha256(path / name) != digest:
                raise ValueError(f"{name} does not match its recorded sha256")
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit this model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]})"
            )
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except TrainError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainError(f"checkpoint {path} is corrupt or incompatible: {reason}") from None
    return state
