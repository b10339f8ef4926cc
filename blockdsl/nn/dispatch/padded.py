"""The "bmm" backend: assignments laid out by a counting sort in an [E, C] (or tiled) grid of
slots, each matmul one `bmm` for all experts, with a hand-written backward."""

from __future__ import annotations

import torch
from torch import Tensor

from blockdsl.nn.dispatch.common import _acc, _activate, _activate_with_backward, _row_bucket, _rowdot


# "bmm": capacity-padded batched matmuls. Assignments are laid out expert-major in an
# [E, C] grid of slots (C = the largest expert load, rounded up to a bucket), each slot
# naming its source row, output row and gate; the empty slots of lighter experts read
# row 0 with gate 0, so they add nothing to the output and their gradients are exactly
# zero. Every matmul is then one `bmm` for all experts, forward and backward, and the op
# count no longer grows with E: at the search's scale (1024 tokens, 8 experts of d = 48)
# a matmul takes tens of microseconds and per-op overhead is a large part of the cost.
# The price is the padding (E * C - M rows computed for nothing), which grows with the
# routing's imbalance; `resolve_impl` says where that wins.
# A hand-written torch.autograd.Function, not a torch.library custom op: nothing here is
# data-dependent once C is known, and a custom op with autograd costs ~80 us of Python per
# forward+backward (measured: a trivial one vs the same clone without it), about a quarter
# of a whole d = 48 expert layer's step. Over round one's plain autograd it saves autograd
# nodes and, in bf16, the per-op casts of the gate product's backward: the backward runs the
# 4 bmm, the activation's backward (act(h) saved, not recomputed), one gather and one
# scatter, and reads the gate gradient off the saved output y (<dL/dy_gated, y>, one row
# dot). Measured (1024 tokens, 8 experts, d = d_ff = 48, gelu, forward+backward of the
# expert FFN alone vs the dense FFN of 2d, thread CPU time, median of 15 interleaved
# rounds, load average 8): fp32 1.95x -> 1.81x the dense layer, bf16 2.78x -> 2.23x. The
# dispatcher op count is about the same (views and transposes count as ops either way).
# Memory: it keeps the gathered input, h, act(h) and y, as autograd did.
class _PaddedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, dst, gate, w1, b1, w2, b2, activation, n_out):
        n_slots = src.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            xb = x.index_select(0, src).view(w1.shape[0], -1, x.shape[1])
            # biases added after the product, not fused (baddbmm): rounding as in the other backends
            h = torch.bmm(xb, w1)
            if b1 is not None:
                h += b1.unsqueeze(1)
            a = None
            if w2 is None:
                y = h
            else:
                a = _activate(h, activation)
                y = torch.bmm(a, w2)
                if b2 is not None:
                    y += b2.unsqueeze(1)
            y = y.view(n_slots, y.shape[-1])
            out = torch.zeros(n_out, y.shape[1], device=x.device, dtype=_acc(x))
            out.index_add_(0, dst, y * gate.unsqueeze(-1))  # fp32 gate: fp32 product
        ctx.save_for_backward(xb, src, dst, gate, w1, w2, h, a, y)
        ctx.static = (activation, x.shape[0], b1 is not None, b2 is not None)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, go):
        xb, src, dst, gate, w1, w2, h, a, y = ctx.saved_tensors
        activation, n_in, has_b1, has_b2 = ctx.static
        need = ctx.needs_input_grad
        with torch.autocast(go.device.type, enabled=False):
            gy = go.to(y.dtype).index_select(0, dst)
            ggate = _rowdot(gy, y).to(gate.dtype) if need[3] else None
            gys = (gy * gate.to(y.dtype).unsqueeze(-1)).view(xb.shape[0], xb.shape[1], y.shape[1])
            gw2 = gb2 = None
            if w2 is None:
                gh = gys
            else:
                if need[6]:
                    gw2 = torch.bmm(a.transpose(1, 2), gys)
                if has_b2 and need[7]:
                    gb2 = gys.sum(1)
                _, act_backward = _activate_with_backward(h, activation, forward=False)
                gh = act_backward(torch.bmm(gys, w2.transpose(1, 2)))
            gw1 = torch.bmm(xb.transpose(1, 2), gh) if need[4] else None
            gb1 = gh.sum(1) if has_b1 and need[5] else None
            gx = None
            if need[0]:
                gxb = torch.bmm(gh, w1.transpose(1, 2)).view(-1, xb.shape[2])
                acc = torch.zeros(n_in, xb.shape[2], device=gxb.device, dtype=_acc(gxb))
                gx = acc.index_add_(0, src, gxb.to(acc.dtype)).to(xb.dtype)
        return gx, None, None, ggate, gw1, gb1, gw2, gb2, None, None


def _capacity_bucket(c: int, x: Tensor) -> int:
    """C rounded up so that few distinct bmm shapes occur.

    oneDNN (CPU bf16/fp16, or fp32 below "highest" matmul precision) compiles a kernel per
    shape, so there C is rounded to 1/16 of its power of two (at most 6.25% padding, 16
    shapes per doubling); MKL's fp32 and GPU kernels compile nothing: a multiple of 8.
    """
    if c <= 0:
        return 0
    if _row_bucket(x) > 1:
        q = max(16, 1 << max(0, c.bit_length() - 5))
    else:
        q = 8
    return -(-c // q) * q


# Routing is rarely balanced: in the search's proxies the busiest expert takes 2-4x the
# mean load (measured over the first 60 steps of benchmarks/moe_search_scale.py's model),
# and one [E, C] grid would compute that many rows for every expert. Past this padding
# ratio the grid is cut into tiles of ~half the mean load instead, a busy expert taking
# several tiles (its weights gathered once per tile): padding then stays under ~1.25x.
TILE_WHEN_PADDING_OVER = 1.25


def _slots(
    expert: Tensor, n_exp: int, x: Tensor, max_load: int | None
) -> tuple[Tensor, Tensor | None]:
    """(assignment index of every slot of the [K, T] grid, flattened, M = empty; the expert
    of each of the K tiles, or None when tile k is expert k).

    A counting sort: `bincount` gives each expert's load, a stable sort by expert id lists
    each expert's assignments in order, and an assignment's place within its expert is its
    sorted position minus the expert's start; expert e's rows fill its tiles from tile
    offset[e] on. Skipped assignments (id E) get no slot. The loads are read on the host
    (one sync, cheap on CPU). A `max_load` bound (a capacity) is used instead, one tile of
    that size per expert, where it is exact (E * max_load <= M: every expert full, as in
    expert choice) or where a sync stalls a queue (GPUs), at the price of padding to it.
    """
    m = expert.shape[0]
    dev = expert.device
    counts = torch.bincount(expert, minlength=n_exp + 1)
    tile_expert = None
    if max_load is not None and (n_exp * max_load <= m or dev.type != "cpu"):
        t = _capacity_bucket(max_load, x)
        tiles = n_exp
        offs = torch.arange(n_exp + 1, device=dev) * t
    else:
        loads = counts.tolist()[:n_exp]
        t = _capacity_bucket(max(loads, default=0), x)
        tiles = n_exp
        if t * n_exp > TILE_WHEN_PADDING_OVER * max(m, 1):
            t = _capacity_bucket(-(-sum(loads) // (2 * n_exp)), x)
            per = [-(-n // t) for n in loads]
            tiles = sum(per)
            tile_expert = torch.tensor(
                [e for e, k in enumerate(per) for _ in range(k)], device=dev, dtype=torch.long
            )
            starts_h = [0]
            for k in per:
                starts_h.append(starts_h[-1] + k * t)
            offs = torch.tensor(starts_h, device=dev)
        else:
            offs = torch.arange(n_exp + 1, device=dev) * t
    order = torch.argsort(expert, stable=True)
    e_sorted = expert.index_select(0, order)
    starts = counts.cumsum(0).sub_(counts)
    slot = (offs - starts).index_select(0, e_sorted).add_(torch.arange(m, device=dev))
    n_slots = tiles * t
    inv = torch.full((n_slots + 1,), m, device=dev, dtype=order.dtype)
    inv.index_copy_(0, slot.clamp_(max=n_slots), order)  # skipped ones land on the spare
    return inv[:n_slots], tile_expert
