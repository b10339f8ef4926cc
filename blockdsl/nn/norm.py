"""Normalisation layers by name, so the lowering can pick LayerNorm or RMSNorm per spec."""

from __future__ import annotations

from torch import nn

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, d: int, eps: float | None = None, bias: bool = True) -> nn.Module:
    """A fresh norm over the last dim; `bias` only applies to LayerNorm (RMSNorm has none).

    Default eps: 1e-5 for LayerNorm (PyTorch, GPT-2), 1e-6 for RMSNorm (T5); models that
    differ (ViT's LayerNorm uses 1e-6) pass `eps` explicitly.
    """
    if kind == "layernorm":
        return nn.LayerNorm(d, eps=1e-5 if eps is None else eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(d, eps=1e-6 if eps is None else eps)
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {', '.join(NORMS)}")
