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
        _publish(out, tmp, final, keep, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _sha_files(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by path relative to it."""
    return {str(f.relative_to(folder)): _sha256(f) for f in sorted(folder.rglob("*")) if f.is_file()}


def _publish(out: Path, tmp: Path, final: Path, keep: int, spec: str | None) -> None:
    """Move a written checkpoint folder into place, point `latest` at it, write the run
    folder's resolved.block (`spec`, when the model has one), prune old ones."""
    if final.exists():
        # a folder of this step from a lost tail (e.g. a damaged checkpoint newer than
        # the one a run resumed from): this run's state replaces it, never the reverse
        stale = Path(tempfile.mkdtemp(dir=out, prefix=".old-ckpt-"))
        os.replace(final, stale / final.name)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fileio.atomic_write(out / LATEST, final.name.encode())
    if spec is not None:  # the run folder names its model beside its checkpoints too
        fileio.atomic_write(out / RESOLVED, spec.encode())
    ckpts = sorted(p for p in out.glob(f"{CKPT_PREFIX}*") if p.is_dir())
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(out: Path, step: int, model: nn.Module,
                            optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int,
                            par: Any) -> Path:
    """A sharded run's checkpoint: out/ckpt-<step>/ with the model and optimizer in `dcp/`
    (torch.distributed.checkpoint: each rank writes its shards; loadable at any world size,
    or in one process), and train_state.pt and meta.json (sha256 of every file) from rank 0.

    Every rank calls this. The folder is written under a temporary name all ranks agree on
    (.tmp-ckpt-<step>) and published by rank 0 after the DCP save returns (rank 0 is DCP's
    coordinator and writes its metadata last), so `latest` never names a half-written one.
    """
    import torch.distributed as tdist

    from blockdsl.train.parallel import save_sharded

    final = out / f"{CKPT_PREFIX}{step:08d}"
    tmp = out / f".tmp-ckpt-{step:08d}"
    main = par.dist.main
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o777 & ~fileio.umask())
    tdist.barrier()
    save_sharded(tmp / "dcp", model, optimizer, par)
    tdist.barrier()
    error: OSError | None = None
    if main:
        try:
            torch.save({"rng": _rng_state(), **state}, tmp / "train_state.pt")
            spec = resolved_spec(model)
            if spec is not None:
                (tmp / RESOLVED).write_text(spec)
            meta = {"step": step, "format": "dcp", "files": _sha_files(tmp)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            _publish(out, tmp, final, keep, spec)
        except OSError as e:
            error = e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    # every rank learns whether rank 0 published it, so none waits in a later collective
    failed = par.dist.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))[0] > 0
    if error is not None:
        raise error
    if failed:
        raise OSError("rank 0 could not publish the checkpoint (see its error)")
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
                    optimizer: torch.optim.Optimizer | None = None,
                    par: Any = None) -> dict[str, Any]:
    """Verify and load a checkpoint folder; any damage becomes a one-line TrainError.

    A sharded (DCP) checkpoint loads into any layout: `par` is this run's
    `parallel.Parallel` (None in one process or plain data parallel). A single-file
    checkpoint cannot resume a sharded run (its model is already cut up): convert nothing,
    resume it without --shard/--ep.
    """
    from safetensors.torch import load_model

    try:
        meta = json.loads((path / "meta.json").read_text())
        for name, digest in meta["files"].items():
            if _sha256(path / name) != digest:
                raise ValueError(f"{name} does not match its recorded sha256")
        if meta.get("format") == "dcp":
            from blockdsl.train.parallel import load_sharded

            load_sharded(path / "dcp", model, optimizer, par)
            return torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        if par is not None and par.active:
            from blockdsl.train.parallel import load_whole

            state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
            load_whole(path / "model.safetensors", state.pop("optimizer"), model, optimizer, par)
            return state
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


def to_single_file(src: Path, model: nn.Module, out: Path, keep: int = 2) -> Path:
    """Convert the sharded checkpoint folder `src` into out/ckpt-<step> in the single-file
    format (model.safetensors + train_state.pt) that `load_checkpoint` and the rest of
    blockdsl read, in this one process; `model` is the spec's model, freshly built.

    The optimizer state, RNG state, step and run state are carried over, so the converted
    checkpoint also resumes (in one process or plain data parallel). Returns the folder.
    """
    from blockdsl.train.optim import make_adamw, param_groups

    device = next(model.parameters()).device
    opt = make_adamw(param_groups(model, 0.0), 1e-3, (0.9, 0.95), device)  # groups: restored
    state = load_checkpoint(src, model, opt)
    rng = state.pop("rng")
    set_rng_state(rng)  # save_checkpoint records the current RNG state
    out.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(out, int(state["step"]), model, opt, state, keep)
