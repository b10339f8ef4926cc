"""Normalisation layers by name, so the lowering can pick LayerNorm or RMSNorm per spec."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from blockdsl.names import NORM_KINDS as NORMS


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that keeps its fused kernel under bf16 autocast.

    There the input is bf16 while the weight stays an fp32 master copy; torch then warns
    ("Mismatch dtype between input and weight") and runs an unfused composite. Here the
    fused kernel runs in fp32 on the upcast input and the result is cast back: one
    rounding, as in the composite (casting the weight to bf16 instead would round it too,
    1 ulp off in places). At the search's width (d = 48, 1024 rows) the three variants'
    forward+backward times were within each other's noise: the warning cost nothing
    measurable, and now there is none.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None or self.weight.dtype == x.dtype:
            return super().forward(x)
        y = F.rms_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.eps)
        return y.to(x.dtype)


def make_norm(kind: str, d: int, eps: float | None = None, bias: bool = True) -> nn.Module:
    """A fresh norm over the last dim; `bias` only applies to LayerNorm (RMSNorm has none).

    Default eps: 1e-5 for LayerNorm (PyTorch, GPT-2), 1e-6 for RMSNorm (T5); models that
    differ (ViT's LayerNorm uses 1e-6) pass `eps` explicitly.
    """
    if kind == "layernorm":
        return nn.LayerNorm(d, eps=1e-5 if eps is None else eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(d, eps=1e-6 if eps is None else eps)
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {', '.join(NORMS)}")
