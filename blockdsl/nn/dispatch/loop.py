"""The "loop" backend: the numerical reference every other backend is tested against."""

from __future__ import annotations

import torch
from torch import Tensor

from blockdsl.nn.dispatch.common import _acc, _activate


def _loop(x: Tensor, src: Tensor, dst: Tensor, expert: Tensor, gate: Tensor, w1: Tensor,
          b1: Tensor | None, w2: Tensor | None, b2: Tensor | None, activation: str,
          n_out: int) -> Tensor:
    """The reference: one masked gather, FFN and scatter per expert, plain autograd.

    Weights are unbound once so the backward stacks E expert gradients instead of writing
    a full-size [E, ...] gradient per expert.
    """
    d_out = (w1 if w2 is None else w2).shape[-1]
    out = torch.zeros(n_out, d_out, device=x.device, dtype=_acc(x))
    dtype = x.dtype
    w1s, b1s = w1.unbind(0), None if b1 is None else b1.unbind(0)
    w2s, b2s = None if w2 is None else w2.unbind(0), None if b2 is None else b2.unbind(0)
    for e in range(w1.shape[0]):
        idx = (expert == e).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        h = x[src[idx]] @ w1s[e]
        if b1s is not None:
            h = h + b1s[e]
        if w2s is not None:
            h = _activate(h, activation) @ w2s[e]
            if b2s is not None:
                h = h + b2s[e]
        dtype = h.dtype
        out = out.index_add(0, dst[idx], gate[idx].unsqueeze(-1) * h.to(out.dtype))
    return out.to(dtype)
