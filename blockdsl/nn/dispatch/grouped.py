"""The "grouped_mm" backend's bodies: the sorted layout as whole-array passes, each matmul one
`torch._grouped_mm` for all experts; and the 16-byte row alignment that op requires."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from blockdsl.nn.dispatch.common import (
    _acc,
    _activate,
    _activate_with_backward,
    _bias_rows,
    _rowdot,
    _segment_sum,
)
from blockdsl.nn.ffn import is_gated


def _gmm(a: Tensor, w: Tensor, offs: Tensor, valid: Tensor | None) -> Tensor:
    y = torch._grouped_mm(a, w, offs=offs)
    return y if valid is None else torch.where(valid, y, 0)


def _valid_rows(offs: Tensor, m: int, skipped: bool) -> Tensor | None:
    return (torch.arange(m, device=offs.device) < offs[-1]).unsqueeze(-1) if skipped else None


def _grouped_forward(x, src, dst, expert, gate, offs, w1, b1, w2, b2, activation, n_out, skipped):
    valid = _valid_rows(offs, src.shape[0], skipped)
    h = _gmm(x.index_select(0, src), w1, offs, valid)
    if b1 is not None:
        h += _bias_rows(b1, expert)
    if w2 is None:
        y, saved = h, h.new_empty(0)
    else:
        y = _gmm(_activate(h, activation), w2, offs, valid)
        if b2 is not None:
            y += _bias_rows(b2, expert)
        saved = h
    out = torch.zeros(n_out, y.shape[1], device=x.device, dtype=_acc(x))
    out.index_add_(0, dst, y * gate.unsqueeze(-1))  # fp32 gate: fp32 product
    return out.to(x.dtype), saved


def _grouped_backward(go, x, src, dst, expert, gate, offs, w1, b1, w2, b2, h, activation, skipped):
    n_exp = w1.shape[0]
    valid = _valid_rows(offs, src.shape[0], skipped)
    gy = go.index_select(0, dst)  # dL/d(gate * y)
    xs = x.index_select(0, src)
    ge = gate.to(x.dtype).unsqueeze(-1)
    if w2 is None:
        u = _gmm(gy, w1.transpose(1, 2), offs, valid)  # dL/dxs before the gate
        ggate = _rowdot(u, xs).to(gate.dtype)
        if b1 is not None:
            ggate += _rowdot(gy, _bias_rows(b1, expert))
        gys = gy * ge
        gw1 = torch._grouped_mm(xs.t(), gys, offs=offs)
        gb1 = _segment_sum(gys, expert, n_exp) if b1 is not None else x.new_empty(0)
        gxs = u.mul_(ge)
        gw2, gb2 = x.new_empty(0), x.new_empty(0)
    else:
        a, act_backward = _activate_with_backward(h, activation)
        u = _gmm(gy, w2.transpose(1, 2), offs, valid)  # dL/da before the gate
        ggate = _rowdot(u, a).to(gate.dtype)
        if b2 is not None:
            ggate += _rowdot(gy, _bias_rows(b2, expert))
        gys = gy * ge
        gw2 = torch._grouped_mm(a.t(), gys, offs=offs)
        gb2 = _segment_sum(gys, expert, n_exp) if b2 is not None else x.new_empty(0)
        gh = act_backward(u.mul_(ge))
        gw1 = torch._grouped_mm(xs.t(), gh, offs=offs)
        gb1 = _segment_sum(gh, expert, n_exp) if b1 is not None else x.new_empty(0)
        gxs = _gmm(gh, w1.transpose(1, 2), offs, valid)
    gx = torch.zeros(x.shape, device=x.device, dtype=_acc(x))
    gx.index_add_(0, src, gxs.to(gx.dtype))
    return gx.to(x.dtype), ggate, gw1, gb1, gw2, gb2


def _pad_dim(t: Tensor, dim: int, to: int) -> Tensor:
    if t.shape[dim] == to:
        return t
    pad = [0, 0] * (t.dim() - dim % t.dim() - 1) + [0, to - t.shape[dim]]
    return F.pad(t, pad)


def _align_for_grouped_mm(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor | None, b2: Tensor | None, act: str
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Zero-pad feature dims so every row is a multiple of 16 bytes (a `_grouped_mm` rule).

    Padded inputs and hidden units are zero and meet zero weight rows, so the result and
    every gradient that is kept are unchanged; this costs one weight copy per call.
    """
    q = max(1, 16 // x.element_size())
    up = lambda n: -(-n // q) * q  # noqa: E731
    d_in = x.shape[1]
    if up(d_in) != d_in:
        x, w1 = _pad_dim(x, 1, up(d_in)), _pad_dim(w1, 1, up(d_in))
    e, dp = w1.shape[0], w1.shape[1]
    if w2 is None:
        n = w1.shape[2]
        if up(n) != n:
            w1 = _pad_dim(w1, 2, up(n))
            b1 = None if b1 is None else _pad_dim(b1, 1, up(n))
        return x, w1, b1, w2, b2
    g = 2 if is_gated(act) else 1
    f = w1.shape[2] // g
    if up(f) != f:  # pad each half (gate, up) of the hidden separately
        w1 = _pad_dim(w1.reshape(e, dp, g, f), 3, up(f)).reshape(e, dp, g * up(f))
        if b1 is not None:
            b1 = _pad_dim(b1.reshape(e, g, f), 2, up(f)).reshape(e, g * up(f))
        w2 = _pad_dim(w2, 1, up(f))
    d_out = w2.shape[2]
    if up(d_out) != d_out:
        w2 = _pad_dim(w2, 2, up(d_out))
        b2 = None if b2 is None else _pad_dim(b2, 1, up(d_out))
    return x, w1, b1, w2, b2
