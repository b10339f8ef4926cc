"""Expert dispatch: out[dst_m] += gate_m * expert_{e_m}(x[src_m]) over flat assignments m.

Why one routing-agnostic core: token choice, expert choice, sigma-MoE and SwitchHead's
per-head V/O experts all reduce to a list of (source row, expert, gate, output row), so
the hot path — sort by expert, segment matmuls, scatter back — is written and tested once.

Backends (`impl`):
- "loop": a Python loop over experts with boolean masks and plain autograd; slow for many
  experts but obviously right: the numerical reference every other backend is tested against.
- "sort": one stable sort by expert, then a loop over the non-empty experts in which each
  expert's rows are gathered, multiplied, activated, multiplied, gated and scattered while
  they are still in cache (one `mm` per expert and matmul); works on every device/dtype.
- "grouped_mm": the same sorted layout as whole-array passes, each matmul done for all
  experts in one `torch._grouped_mm` call (feature dims zero-padded to 16-byte rows when
  needed); no host sync, few large kernels: the GPU path.
- "bmm": assignments laid out in an [E, C] (or tiled) grid of slots by a counting sort,
  each matmul one `bmm` for all experts: op count independent of E, for many small
  experts and few tokens (the search's scale), at the price of padded rows.
- "auto": see `resolve_impl` (chosen per shape, device and precision).

"bmm" is plain autograd (no data-dependent loop once the grid is sized; see its notes).
"sort" and "grouped_mm" run inside the custom op `blockdsl::expert_ffn` (with a fake
implementation and a hand-written backward, itself the op `blockdsl::expert_ffn_backward`)
so `torch.compile` traces a model around the data-dependent expert loop instead of into it.
The op saves only the pre-activation hidden `h`; the gathered input is re-gathered in the
backward, and the gate gradient uses <dy, act(h) W2> = <dy W2^T, act(h)>, so no matmul is
recomputed.

An expert id equal to the number of experts marks an assignment to skip (a token dropped
by capacity): it sorts to the tail, outside every segment, and contributes nothing.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from blockdsl.names import DISPATCH as IMPLS
from blockdsl.names import GATE_OF, SMALL_EXPERT_WEIGHT
from blockdsl.nn.ffn import activate, is_gated

# Elementwise activation behind each FFN activation name, and its derivative written into
# `out` given (dL/da, h). ffn.py owns the forward; the backward must be explicit because
# custom-op bodies run below autograd.
_BASE = GATE_OF
_ACT_BWD: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "relu": lambda g, h, out: torch.ops.aten.threshold_backward.grad_input(g, h, 0.0, grad_input=out),
    "gelu": lambda g, h, out: torch.ops.aten.gelu_backward.grad_input(
        g, h, approximate="none", grad_input=out
    ),
    "gelu_tanh": lambda g, h, out: torch.ops.aten.gelu_backward.grad_input(
        g, h, approximate="tanh", grad_input=out
    ),
    "silu": lambda g, h, out: torch.ops.aten.silu_backward.grad_input(g, h, grad_input=out),
}


def _activate(h: Tensor, activation: str) -> Tensor:
    return h if activation == "none" else activate(h, activation)


def _activate_with_backward(
    h: Tensor, activation: str, forward: bool = True
) -> tuple[Tensor | None, Callable[[Tensor], Tensor]]:
    """a = act(h) and the map dL/da -> dL/dh, sharing act(gate) between the two.

    For gated kinds h = [gate | up], a = act(gate) * up; the gradient halves are written
    straight into one buffer (no concatenation). `forward=False` (a caller that saved a)
    skips computing a where the backward does not need it (ungated kinds): a = None.
    """
    if activation == "none":
        return h, lambda grad_a: grad_a
    base = _BASE.get(activation, activation)
    fn = _ACT_BWD[base]
    if not is_gated(activation):
        a = activate(h, base) if forward else None
        return a, lambda grad_a: fn(grad_a, h, torch.empty_like(h))
    gate, up = h.chunk(2, dim=-1)
    act_gate = activate(gate, base)

    def backward(grad_a: Tensor) -> Tensor:
        gh = torch.empty_like(h)
        f = gate.shape[-1]
        fn(grad_a * up, gate, gh[..., :f])
        torch.mul(grad_a, act_gate, out=gh[..., f:])
        return gh

    return act_gate * up, backward


# --------------------------------------------------------------------------- backends
@functools.cache
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs (forward and weight-gradient forms) here.

    Probed once per (device type, dtype) with a tiny call rather than read from version
    tables: CPU kernels arrived in torch 2.9, CUDA needs sm80+/bf16, and that will change.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        dev = torch.device(device_type)
        a = torch.ones(8, 8, device=dev, dtype=dtype)
        w = torch.ones(2, 8, 8, device=dev, dtype=dtype)
        offs = torch.tensor([3, 8], device=dev, dtype=torch.int32)
        y = torch._grouped_mm(a, w, offs=offs)
        gw = torch._grouped_mm(a.t(), y, offs=offs)
        return bool(torch.isfinite(gw).all())
    except (RuntimeError, NotImplementedError, TypeError):
        return False


# Expert weight size (d_in x first-layer width) up to which "auto" takes "bmm" on CPU.
# Evidence (CPU, torch 2.13; see resolve_impl): every MoE slot of the default search space
# is within it (d <= 64, d_moe <= 4d, gated: 64 x 512 = 32768), MoEUT-44M's experts
# (412 x 128 = 52736, 412 x 256 gated) and the coarse 8x512 shape's (256 x 1024) are not.
# Rows per expert barely separate these (256-512 in the search, 317 in MoEUT-44M).
# (The value lives in blockdsl.names: the torch-free memory estimate reads it too.)


def resolve_impl(
    impl: str,
    device: torch.device,
    dtype: torch.dtype,
    d_in: int | None = None,
    d_hidden: int | None = None,
) -> str:
    """Map "auto" (and an unavailable "grouped_mm") to a concrete backend for this shape.

    Rule. CPU: "bmm" when an expert's weights are small (d_in * d_hidden <=
    SMALL_EXPERT_WEIGHT), else "grouped_mm" (if `_grouped_mm` runs, else "sort"). CUDA:
    "grouped_mm" when it runs for the dtype (one kernel per matmul, no host sync; chosen,
    not measured here: no GPU), else "bmm" (few large kernels; one host sync for the grid
    unless the routing bounds the load). Without a shape the large-matmul rule applies.

    Evidence, CPU, one quiet run each (load 0.3-1.6; medians of interleaved rounds, the
    min-max spread in the files named):
    - search scale (benchmarks/moe_search_scale.py, docs/bench/moe_search_scale.txt;
      d = 48, 8 experts, top-2, 1024 tokens, 1 thread; whole-model train step against the
      dense model of equal FLOPs): "bmm" 1.45x (1.37-1.55) in fp32 and 1.48x (1.25-1.59)
      in bf16, "sort" 2.07x and 3.02x. Here per-op overhead rules (ops per step: dense
      1610, "bmm" 2477, "sort" 5258), and "bmm" runs one op per matmul for all experts.
    - coarse 8x512 d256 and MoEUT-44M 155x128 d412, 4096 tokens, 2 threads
      (benchmarks/moe_layer.py, docs/bench/moe_layer.txt), ms per fwd+bwd:
      fp32 coarse: grouped_mm 171, sort 173, bmm 180; MoEUT: bmm 784, grouped_mm 808,
      sort 981. bf16 coarse: grouped_mm 96, bmm 102, sort 123; MoEUT: grouped_mm 473,
      bmm 501, sort 971. Where matmuls dominate, "bmm"'s padding and per-tile weight
      copies cost a few percent and "grouped_mm" is exact; "sort" loses in bf16. The
      spreads are 10-25% wide, so ties within them are ties.
    `blockdsl compile --tune` races all backends at the real shape and overrides this.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown dispatch {impl!r}; expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        grouped = grouped_mm_available(device.type, dtype)
        if device.type == "cuda":
            return "grouped_mm" if grouped else "bmm"
        if d_in is not None and d_hidden is not None and d_in * d_hidden <= SMALL_EXPERT_WEIGHT:
            return "bmm"
        return "grouped_mm" if grouped else "sort"
    if impl == "grouped_mm" and not grouped_mm_available(device.type, dtype):
        warnings.warn(
            f"torch._grouped_mm is unavailable for {dtype} on {device.type}; using 'sort'",
            stacklevel=3,
        )
        return "sort"
    return impl


def _segments(offs: Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty segment; one host sync."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out.append((e, start, end))
        start = end
    return out


def _bias_rows(b: Tensor, expert: Tensor) -> Tensor:
    """b[expert] with a zero row for the skip id E."""
    return torch.cat((b, b.new_zeros(1, b.shape[1]))).index_select(0, expert)


def _segment_sum(g: Tensor, expert: Tensor, n_experts: int) -> Tensor:
    out = g.new_zeros(n_experts + 1, g.shape[1], dtype=torch.float32)
    return out.index_add_(0, expert, g.float())[:n_experts].to(g.dtype)


def _expert_grad(t: Tensor | None, segs: list[tuple[int, int, int]], like: Tensor) -> Tensor:
    """Uninitialised per-expert gradient with only the experts that got no rows zeroed."""
    if t is None:
        return like.new_empty(0)
    g = torch.empty_like(t)
    idle = sorted(set(range(t.shape[0])) - {e for e, _, _ in segs})
    if idle:
        g[idle] = 0
    return g


def _acc(x: Tensor) -> torch.dtype:
    """Scatter accumulators are fp32 at least: k contributions per row lose bits in bf16."""
    return torch.promote_types(x.dtype, torch.float32)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-row dot product (the gate gradient) in one pass, no [n, f] temporary."""
    return torch.linalg.vecdot(a, b)


# oneDNN (CPU matmuls in bf16/fp16, and fp32 ones under "medium"/"high" matmul precision)
# compiles a kernel per matmul shape and keeps 1024 of them. Per-expert row counts change
# every step, so nearly every expert matmul would be a new shape: on a tiny MoEUT in bf16
# an expert matmul took 737 us uncached against 91 us cached (a 2.8x slower train step).
# Row counts rounded up to a multiple of ROW_BUCKET (zero rows, dropped again) keep the
# shapes few enough to stay cached; fp32 CPU matmuls and GPUs need no such rounding.
ROW_BUCKET = 32


def _row_bucket(x: Tensor) -> int:
    if x.device.type != "cpu":
        return 1
    if x.dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest":
        return ROW_BUCKET
    return 1


def _mm_rows(a: Tensor, b: Tensor, bucket: int, out: Tensor | None = None) -> Tensor:
    """a [m, k] @ b, computed with m rounded up to `bucket` (zero rows) and cut back."""
    pad = -a.shape[0] % bucket
    if not pad:
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    y = torch.mm(F.pad(a, (0, 0, 0, pad)), b)[: a.shape[0]]
    return y if out is None else out.copy_(y)


def _mm_sum(at: Tensor, g: Tensor, bucket: int, out: Tensor) -> Tensor:
    """at [f, m] @ g [m, d] (a weight gradient) with the summed m padded by zero rows."""
    pad = -g.shape[0] % bucket
    if pad:
        at, g = F.pad(at, (0, pad)), F.pad(g, (0, 0, 0, pad))
    return torch.mm(at, g, out=out)


# "sort": a fused loop over the non-empty experts. Each expert's rows are gathered, pushed
# through both matmuls and the activation, and scattered while they are still in cache.
# On CPU this beats whole-array passes, which stream [M, d] temporaries through memory
# (measured in benchmarks/moe_layer.py, most for many small experts as in MoEUT).
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


# --------------------------------------------------------------------------- custom op
@torch.library.custom_op("blockdsl::expert_ffn", mutates_args=())
def _expert_ffn(
    x: Tensor,
    src: Tensor,
    dst: Tensor,
    expert: Tensor,
    gate: Tensor,
    offs: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor | None,
    b2: Tensor | None,
    activation: str,
    n_out: int,
    backend: str,
    skipped: bool,
) -> tuple[Tensor, Tensor]:
    """Sorted assignments -> (out [n_out, d_out], saved pre-activation h [M, F] or [0])."""
    with torch.autocast(x.device.type, enabled=False):
        if backend == "grouped_mm":
            return _grouped_forward(
                x, src, dst, expert, gate, offs, w1, b1, w2, b2, activation, n_out, skipped
            )
        return _sort_forward(x, src, dst, gate, offs, w1, b1, w2, b2, activation, n_out)


@_expert_ffn.register_fake
def _(x, src, dst, expert, gate, offs, w1, b1, w2, b2, activation, n_out, backend, skipped):
    d_out = w1.shape[-1] if w2 is None else w2.shape[-1]
    saved = x.new_empty(0) if w2 is None else x.new_empty(src.shape[0], w1.shape[-1])
    return x.new_empty(n_out, d_out), saved


@torch.library.custom_op("blockdsl::expert_ffn_backward", mutates_args=())
def _expert_ffn_backward(
    grad_out: Tensor,
    x: Tensor,
    src: Tensor,
    dst: Tensor,
    expert: Tensor,
    gate: Tensor,
    offs: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor | None,
    b2: Tensor | None,
    h: Tensor,
    activation: str,
    backend: str,
    skipped: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, gate, w1, b1, w2, b2); a missing weight or bias gets an empty tensor."""
    with torch.autocast(x.device.type, enabled=False):
        go = grad_out.to(x.dtype)
        if backend == "grouped_mm":
            grads = _grouped_backward(
                go, x, src, dst, expert, gate, offs, w1, b1, w2, b2, h, activation, skipped
            )
        else:
            grads = _sort_backward(go, x, src, dst, gate, offs, w1, b1, w2, b2, h, activation)
        gx, ggate, gw1, gb1, gw2, gb2 = grads
        return gx, ggate.to(gate.dtype), gw1, gb1, gw2, gb2


@_expert_ffn_backward.register_fake
def _(grad_out, x, src, dst, expert, gate, offs, w1, b1, w2, b2, h, activation, backend, skipped):
    def like(t: Tensor | None) -> Tensor:
        return x.new_empty(0) if t is None else torch.empty_like(t)

    return like(x), like(gate), like(w1), like(b1), like(w2), like(b2)


def _setup_context(ctx, inputs, output) -> None:
    x, src, dst, expert, gate, offs, w1, b1, w2, b2, activation, _n, backend, skipped = inputs
    ctx.save_for_backward(x, src, dst, expert, gate, offs, w1, b1, w2, b2, output[1])
    ctx.static = (activation, backend, skipped)
    ctx.set_materialize_grads(False)  # never build a zero gradient for the saved output h


def _backward(ctx, grad_out: Tensor | None, _grad_h: Tensor | None):
    if grad_out is None:
        return (None,) * 14
    x, src, dst, expert, gate, offs, w1, b1, w2, b2, h = ctx.saved_tensors
    activation, backend, skipped = ctx.static
    gx, ggate, gw1, gb1, gw2, gb2 = _expert_ffn_backward(
        grad_out.contiguous(), x, src, dst, expert, gate, offs, w1, b1, w2, b2, h,
        activation, backend, skipped,
    )  # fmt: skip
    return (
        gx, None, None, None, ggate, None, gw1,
        None if b1 is None else gb1,
        None if w2 is None else gw2,
        None if b2 is None else gb2,
        None, None, None, None,
    )  # fmt: skip


_expert_ffn.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry point
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


def _loop(
    x: Tensor,
    src: Tensor,
    dst: Tensor,
    expert: Tensor,
    gate: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor | None,
    b2: Tensor | None,
    activation: str,
    n_out: int,
) -> Tensor:
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


def expert_mixture(
    x: Tensor,
    src: Tensor,
    expert: Tensor,
    gate: Tensor,
    w1: Tensor,
    b1: Tensor | None = None,
    w2: Tensor | None = None,
    b2: Tensor | None = None,
    *,
    activation: str = "none",
    dst: Tensor | None = None,
    n_out: int | None = None,
    impl: str = "auto",
    skipped: bool = False,
    max_load: int | None = None,
) -> Tensor:
    """Σ_m gate_m · f_{e_m}(x[src_m]) scattered into rows dst_m of an [n_out, d_out] result.

    x [N, d_in]; src, expert, gate [M]; w1 [E, d_in, F], b1 [E, F]; w2 [E, f, d_out], b2
    [E, d_out]. f_e(v) = act(v W1_e + b1_e) W2_e + b2_e, or v W1_e + b1_e when w2 is None
    (SwitchHead's V/O projections). dst defaults to src, n_out to N. `skipped` must be
    True when some expert ids equal E (dropped assignments); the fast backends then mask
    rather than sync. `max_load`, when the routing guarantees it (a capacity), bounds the
    assignments any expert gets, so "bmm" can size its slots without a host sync. Under
    autocast the matmuls run in the autocast dtype; the scatter accumulates in fp32.
    Returns the compute dtype.
    """
    n_exp = w1.shape[0]
    dst = src if dst is None else dst
    n_out = x.shape[0] if n_out is None else n_out
    if w2 is not None and activation == "none":
        raise ValueError("a two-layer expert needs an activation")
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dt), w1.to(dt), None if w2 is None else w2.to(dt)
        b1 = None if b1 is None else b1.to(dt)
        b2 = None if b2 is None else b2.to(dt)
    else:
        dt = torch.promote_types(x.dtype, w1.dtype)
        x, w1 = x.to(dt), w1.to(dt)
    backend = resolve_impl(impl, x.device, dt, x.shape[1], w1.shape[-1])
    gdt = torch.promote_types(gate.dtype, torch.float32)  # gates stay >= fp32
    if backend == "loop":
        return _loop(x, src, dst, expert, gate.to(gdt), w1, b1, w2, b2, activation, n_out)
    if backend == "bmm":
        inv, tile_expert = _slots(expert, n_exp, x, max_load)
        pad = lambda t: F.pad(t, (0, 1)).index_select(0, inv)  # noqa: E731  slot M: row 0, gate 0
        src_p = pad(src)
        dst_p = src_p if dst is src else pad(dst)
        if tile_expert is not None:  # each tile's own copy of its expert's weights
            w1, b1, w2, b2 = (
                None if w is None else w.index_select(0, tile_expert) for w in (w1, b1, w2, b2)
            )
        return _PaddedFFN.apply(
            x, src_p, dst_p, pad(gate.to(gdt)), w1, b1, w2, b2, activation, n_out
        )

    order = torch.argsort(expert, stable=True)
    expert_s = expert.index_select(0, order)
    bounds = torch.arange(1, n_exp + 1, device=expert.device, dtype=expert_s.dtype)
    offs = torch.searchsorted(expert_s, bounds, out_int32=True)
    d_out = (w1 if w2 is None else w2).shape[-1]
    if backend == "grouped_mm":
        x, w1, b1, w2, b2 = _align_for_grouped_mm(x, w1, b1, w2, b2, activation)
    out, _ = _expert_ffn(
        x, src.index_select(0, order), dst.index_select(0, order), expert_s,
        gate.to(gdt).index_select(0, order), offs, w1, b1, w2, b2,
        activation, n_out, backend, skipped,
    )  # fmt: skip
    return out if out.shape[1] == d_out else out[:, :d_out]
