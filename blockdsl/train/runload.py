"""Rebuild a trained model from its folder alone: `blockdsl.load_run(DIR)`.

A run folder (what `blockdsl train --out` writes) holds `ckpt-<step>/` folders and
`latest`; each checkpoint's `model.safetensors` carries the resolved spec in its metadata
and a `resolved.block` beside it (see `checkpoint.save_checkpoint`). The spec is read
from the weights file first, because that is the copy that travels with the weights; a
bare folder holding only `model.safetensors` and `resolved.block` (an exported or copied
checkpoint) loads the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockdsl.train.checkpoint import RESOLVED, SPEC_KEY, checkpoint_folders, latest_checkpoint
from blockdsl.train.config import TrainError

WEIGHTS = "model.safetensors"


def find_weights(path: str | Path) -> Path:
    """The checkpoint folder `path` names: itself when it holds model.safetensors, else
    the one its `latest` names, else its newest `ckpt-<step>`; a TrainError names what is
    missing."""
    p = Path(path)
    if not p.is_dir():
        raise TrainError(f"{p} is not a folder (expected a run folder or a checkpoint folder)")
    if (p / WEIGHTS).is_file():
        return p
    found = latest_checkpoint(p) or next(iter(checkpoint_folders(p)), None)
    if found is None or not (found / WEIGHTS).is_file():
        raise TrainError(f"{p} holds no {WEIGHTS} and no ckpt-<step> folder with one: "
                         "is it a run folder written by `blockdsl train`?")
    return found


def read_spec(folder: Path) -> tuple[str, dict[str, str]]:
    """(resolved .block text, the weights' metadata) of a checkpoint folder."""
    from safetensors import safe_open

    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # a damaged header: safetensors raises its own error types
        raise TrainError(f"{folder / WEIGHTS} is not a readable safetensors file: {e}") from None
    spec = meta.get(SPEC_KEY)
    if spec is None and (folder / RESOLVED).is_file():
        spec = (folder / RESOLVED).read_text()
    if spec is None:
        raise TrainError(f"{folder} does not say which model its weights are for (no spec in "
                         f"{WEIGHTS}'s metadata, no {RESOLVED}); it was written before "
                         "blockdsl recorded it: rebuild with blockdsl.build(SPEC) and "
                         "load the weights yourself")
    return spec, meta


def load_run(path: str | Path, device: Any = "cpu", precision: str = "fp32") -> Any:
    """The model a run (or checkpoint) folder holds, built from its recorded spec with its
    weights loaded, in eval mode. The checkpoint's sha256 record is checked first."""
    import torch

    from blockdsl import build
    from blockdsl.train.checkpoint import load_checkpoint

    folder = find_weights(path)
    spec, _ = read_spec(folder)
    model = build(spec, device=device, precision=precision)
    if (folder / "meta.json").is_file():
        load_checkpoint(folder, model)
    else:
        from safetensors.torch import load_model

        load_model(model, str(folder / WEIGHTS), strict=True, device=str(torch.device(device)))
    return model.eval()
