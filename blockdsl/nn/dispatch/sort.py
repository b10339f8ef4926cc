"""The "sort" backend's bodies: assignments sorted by expert, one `mm` per expert and matmul
while its rows are in cache. Run inside the custom op (see `op.py`)."""

from __future__ import annotations

import torch

from blockdsl.nn.dispatch.common import (
    _acc,
    _activate,
    _activate_with_backward,
    _expert_grad,
    _mm_rows,
    _mm_sum,
    _row_bucket,
    _rowdot,
    _segments,
)


def _sort_forward(x, src, dst, gate, offs, w1, b1, w2, b2, activation, n_out):
    d_out = (w1 if w2 is None else w2).shape[-1]
    out = torch.zeros(n_out, d_out, device=x.device, dtype=_acc(x))
    h = x.new_empty(0) if w2 is None else x.new_empty(src.shape[0], w1.shape[-1])
    segs = _segments(offs)
    h[segs[-1][2] if segs else 0 :] = 0  # rows of skipped assignments
    bk = _row_bucket(x)
    for e, s, t in segs:
        xe = x.index_select(0, src[s:t])
        if w2 is None:
            ye = _mm_rows(xe, w1[e], bk)
            if b1 is not None:
                ye += b1[e]
        else:
            he = h[s:t]
            _mm_rows(xe, w1[e], bk, out=he)
            if b1 is not None:
                he += b1[e]
            ae = _activate(he, activation)
            ye = _mm_rows(ae, w2[e], bk)
            if b2 is not None:
                ye += b2[e]
        out.index_add_(0, dst[s:t], ye * gate[s:t].unsqueeze(-1))  # fp32 gate: fp32 product
    return out.to(x.dtype), h


def _gated_out_backward(gye, ge, inp, w, b, bk, gw, ggate_dtype):
    """Backward of gate * (inp W + b) for one expert's rows: the gate gradient, W's gradient
    (written into `gw`), b's gradient (None without a bias) and dL/d(inp), gate included."""
    u = _mm_rows(gye, w.t(), bk)  # dL/d(inp) before the gate
    ggate = _rowdot(u, inp).to(ggate_dtype)
    if b is not None:
        ggate += torch.mv(gye, b)
    gys = gye * ge
    _mm_sum(inp.t(), gys, bk, out=gw)
    return ggate, None if b is None else gys.sum(0), u.mul_(ge)


def _sort_backward(go, x, src, dst, gate, offs, w1, b1, w2, b2, h, activation):
    gx = torch.zeros(x.shape, device=x.device, dtype=_acc(x))
    ggate = torch.zeros_like(gate)
    segs = _segments(offs)
    gw1, gb1, gw2, gb2 = (_expert_grad(t, segs, x) for t in (w1, b1, w2, b2))
    bk = _row_bucket(x)
    for e, s, t in segs:
        gye = go.index_select(0, dst[s:t])  # dL/d(gate * y)
        ge = gate[s:t].unsqueeze(-1).to(x.dtype)
        xe = x.index_select(0, src[s:t])
        if w2 is None:
            ggate[s:t], gb, gxe = _gated_out_backward(
                gye, ge, xe, w1[e], None if b1 is None else b1[e], bk, gw1[e], ggate.dtype
            )
            if gb is not None:
                gb1[e] = gb
        else:
            ae, act_backward = _activate_with_backward(h[s:t], activation)
            ggate[s:t], gb, gae = _gated_out_backward(
                gye, ge, ae, w2[e], None if b2 is None else b2[e], bk, gw2[e], ggate.dtype
            )
            if gb is not None:
                gb2[e] = gb
            ghe = act_backward(gae)
            _mm_sum(xe.t(), ghe, bk, out=gw1[e])
            if b1 is not None:
                gb1[e] = ghe.sum(0)
            gxe = _mm_rows(ghe, w1[e].t(), bk)
        gx.index_add_(0, src[s:t], gxe.to(gx.dtype))
    return gx.to(x.dtype), ggate, gw1, gb1, gw2, gb2


# "grouped_mm": whole-array passes (gather all rows once, one `_grouped_mm` per matmul over
# all segments, one scatter) and no host sync: few large kernels, what a GPU wants.
# `_grouped_mm` leaves rows past offs[-1] (skipped assignments) uninitialised, so with
# `skipped` they are masked after every call.
