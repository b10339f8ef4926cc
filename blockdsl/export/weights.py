"""The weights and spec every export format writes beside its model code."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from blockdsl.runs import RESOLVED, resolved_spec, weights_metadata


def save_weights(model: nn.Module, out: Path) -> Path:
    """out/model.safetensors (a shared tensor stored once, the spec and blockdsl's version
    in its metadata) and out/resolved.block; returns the weights' path."""
    from safetensors.torch import save_model

    spec = resolved_spec(model)
    path = out / "model.safetensors"
    save_model(model, str(path), metadata=weights_metadata(spec))
    if spec is not None:
        (out / RESOLVED).write_text(spec)
    return path
