"""Expert dispatch: out[dst_m] += gate_m * expert_{e_m}(x[src_m]) over flat assignments m.

Why one routing-agnostic core: token choice, expert choice, sigma-MoE and SwitchHead's
per-head V/O experts all reduce to a list of (source row, expert, gate, output row), so
the hot path — sort by expert, segment matmuls, scatter back — is written and tested once.

Backends (`impl`):
- "loop": a Python loop over experts with boolean masks and plain autograd; slow for many
  experts but obviously right: the numerical reference every other backend is tested against.
- "sort": one stable sort by expert, then per-segment matmuls over the non-empty experts
  (one `mm` per expert and matmul); works on every device and dtype.
- "grouped_mm": the same sorted layout, each expert matmul done for all experts in one
  `torch._grouped_mm` call (feature dims zero-padded to 16-byte rows when needed).
- "auto": see `resolve_impl`.

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

import torch
import torch.nn.functional as F
from torch import Tensor

from blockdsl.nn.ffn import activate, is_gated

IMPLS: tuple[str, ...] = ("auto", "grouped_mm", "sort", "loop")

# Elementwise activation name of each FFN activation, and d act / d h given (grad, h).
# (ffn.py owns the forward; the backward must be explicit because custom-op bodies run
# below autograd.)
_BASE = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
_ACT_BWD = {
    "relu": lambda g, h: torch.ops.aten.threshold_backward(g, h, 0.0),
    "gelu": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="none"),
    "gelu_tanh": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    "silu": lambda g, h: torch.ops.aten.silu_backward(g, h),
}


def _activation_backward(grad_a: Tensor, h: Tensor, activation: str) -> Tensor:
    """dL/dh from dL/da for a = activate(h, activation) (gate = first half when gated)."""
    if activation == "none":
        return grad_a
    fn = _ACT_BWD[_BASE.get(activation, activation)]
    if not is_gated(activation):
        return fn(grad_a, h)
    gate, up = h.chunk(2, dim=-1)
    act_gate = activate(gate, _BASE[activation])
    return torch.cat((fn(grad_a * up, gate), grad_a * act_gate), dim=-1)


def _activate(h: Tensor, activation: str) -> Tensor:
    return h if activation == "none" else activate(h, activation)


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


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """Map "auto" (and an unavailable "grouped_mm") to a concrete backend.

    Rule, from benchmarks/moe_layer.py: "grouped_mm" on CUDA when `_grouped_mm` runs for
    the compute dtype; everywhere else "sort" — on CPU (torch 2.13) the per-segment oneDNN
    matmuls match or beat `_grouped_mm` in fp32 and clearly beat it in bf16.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown dispatch {impl!r}; expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        if device.type == "cuda" and grouped_mm_available(device.type, dtype):
            return "grouped_mm"
        return "sort"
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


class _Plan:
    """How one op call multiplies segments: per-segment `mm` or one `_grouped_mm`."""

    def __init__(self, backend: str, offs: Tensor, m: int, skipped: bool) -> None:
        self.backend = backend
        self.offs = offs
        self.m = m
        if backend == "sort":
            self.segs = _segments(offs)
            self.m_valid = self.segs[-1][2] if self.segs else 0
            self.valid = None
        else:
            # _grouped_mm leaves rows past offs[-1] uninitialised: mask them (sync-free).
            self.valid = (
                (torch.arange(m, device=offs.device) < offs[-1]).unsqueeze(-1) if skipped else None
            )

    def mask(self, t: Tensor) -> Tensor:
        if self.backend == "sort":
            if self.m_valid < self.m:
                t[self.m_valid :].zero_()
            return t
        return t if self.valid is None else torch.where(self.valid, t, 0)

    def mm(self, a: Tensor, w: Tensor) -> Tensor:
        """Row segment s of a [M, K] times w[e_s] ([E, K, N]) -> [M, N]."""
        if self.backend == "grouped_mm":
            return self.mask(torch._grouped_mm(a, w, offs=self.offs))
        out = a.new_empty(a.shape[0], w.shape[-1])
        for e, s, t in self.segs:
            torch.mm(a[s:t], w[e], out=out[s:t])
        return self.mask(out)

    def wgrad(self, a: Tensor, g: Tensor, n_experts: int) -> Tensor:
        """Per expert a_sᵀ g_s -> [E, K, N] (zero for empty experts)."""
        if self.backend == "grouped_mm":
            return torch._grouped_mm(a.t(), g, offs=self.offs)
        out = a.new_zeros(n_experts, a.shape[1], g.shape[1])
        for e, s, t in self.segs:
            torch.mm(a[s:t].t(), g[s:t], out=out[e])
        return out


def _bias_rows(b: Tensor, expert: Tensor) -> Tensor:
    """b[expert] with a zero row for the skip id E."""
    return torch.cat((b, b.new_zeros(1, b.shape[1]))).index_select(0, expert)


def _segment_sum(g: Tensor, expert: Tensor, n_experts: int) -> Tensor:
    out = g.new_zeros(n_experts + 1, g.shape[1], dtype=torch.float32)
    return out.index_add_(0, expert, g.float())[:n_experts].to(g.dtype)


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
        plan = _Plan(backend, offs, src.shape[0], skipped)
        h = plan.mm(x.index_select(0, src), w1)  # skipped rows are 0 from here on
        if b1 is not None:
            h += _bias_rows(b1, expert)
        if w2 is None:
            y, saved = h, h.new_empty(0)
        else:
            y = plan.mm(_activate(h, activation), w2)
            if b2 is not None:
                y += _bias_rows(b2, expert)
            saved = h
        y = gate.unsqueeze(-1) * y.float()
        out = torch.zeros(n_out, y.shape[1], device=x.device, dtype=torch.float32)
        out.index_add_(0, dst, y)
        return out.to(x.dtype), saved


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
    """Gradients (x, gate, w1, b1, w2, b2); a missing bias gets an empty tensor."""
    with torch.autocast(x.device.type, enabled=False):
        plan = _Plan(backend, offs, src.shape[0], skipped)
        n_exp = w1.shape[0]
        gy = grad_out.to(x.dtype).index_select(0, dst)  # dL/d(gate * y)
        xs = x.index_select(0, src)
        gate_c = gate.to(x.dtype).unsqueeze(-1)
        if w2 is None:
            u = plan.mm(gy, w1.transpose(1, 2))  # dL/dxs before the gate
            ggate = (u * xs).sum(-1, dtype=torch.float32)
            if b1 is not None:
                ggate += (gy * _bias_rows(b1, expert)).sum(-1, dtype=torch.float32)
            gys = gy * gate_c
            gw1 = plan.wgrad(xs, gys, n_exp)
            gb1 = _segment_sum(gys, expert, n_exp) if b1 is not None else x.new_empty(0)
            gxs = u * gate_c
            gw2, gb2 = x.new_empty(0), x.new_empty(0)
        else:
            a = _activate(h, activation)
            u = plan.mm(gy, w2.transpose(1, 2))  # dL/da before the gate
            ggate = (u * a).sum(-1, dtype=torch.float32)
            if b2 is not None:
                ggate += (gy * _bias_rows(b2, expert)).sum(-1, dtype=torch.float32)
            gys = gy * gate_c
            gw2 = plan.wgrad(a, gys, n_exp)
            gb2 = _segment_sum(gys, expert, n_exp) if b2 is not None else x.new_empty(0)
            gh = _activation_backward(u * gate_c, h, activation)
            gw1 = plan.wgrad(xs, gh, n_exp)
            gb1 = _segment_sum(gh, expert, n_exp) if b1 is not None else x.new_empty(0)
            gxs = plan.mm(gh, w1.transpose(1, 2))
        gx = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
        gx.index_add_(0, src, gxs.float())
        return gx.to(x.dtype), ggate.to(gate.dtype), gw1, gb1, gw2, gb2


@_expert_ffn_backward.register_fake
def _(grad_out, x, src, dst, expert, gate, offs, w1, b1, w2, b2, h, activation, backend, skipped):
    def like(t: Tensor | None) -> Tensor:
        return x.new_empty(0) if t is None else torch.empty_like(t)

    return like(x), like(gate), like(w1), like(b1), like(w2), like(b2)


def _setup_context(ctx, inputs, output) -> None:
    x, src, dst, expert, gate, offs, w1, b1, w2, b2, activation, _n, backend, skipped = inputs
    ctx.save_for_backward(x, src, dst, expert, gate, offs, w1, b1, w2, b2, output[1])
    ctx.static = (activation, backend, skipped)


def _backward(ctx, grad_out: Tensor, _grad_h: Tensor):
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
    """The reference: one masked gather, FFN and scatter per expert, plain autograd."""
    d_out = (w1 if w2 is None else w2).shape[-1]
    out = torch.zeros(n_out, d_out, device=x.device, dtype=torch.float32)
    dtype = x.dtype
    for e in range(w1.shape[0]):
        idx = (expert == e).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        h = x[src[idx]] @ w1[e]
        if b1 is not None:
            h = h + b1[e]
        if w2 is not None:
            h = _activate(h, activation) @ w2[e]
            if b2 is not None:
                h = h + b2[e]
        dtype = h.dtype
        out = out.index_add(0, dst[idx], gate[idx].unsqueeze(-1) * h.float())
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
) -> Tensor:
    """Σ_m gate_m · f_{e_m}(x[src_m]) scattered into rows dst_m of an [n_out, d_out] result.

    x [N, d_in]; src, expert, gate [M]; w1 [E, d_in, F], b1 [E, F]; w2 [E, f, d_out], b2
    [E, d_out]. f_e(v) = act(v W1_e + b1_e) W2_e + b2_e, or v W1_e + b1_e when w2 is None
    (SwitchHead's V/O projections). dst defaults to src, n_out to N. `skipped` must be
    True when some expert ids equal E (dropped assignments); the fast backends then mask
    rather than sync. Under autocast the matmuls run in the autocast dtype; the scatter
    accumulates in fp32. Returns the compute dtype.
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
    backend = resolve_impl(impl, x.device, dt)
    if backend == "loop":
        return _loop(x, src, dst, expert, gate.float(), w1, b1, w2, b2, activation, n_out)

    order = torch.argsort(expert, stable=True)
    expert_s = expert.index_select(0, order)
    bounds = torch.arange(1, n_exp + 1, device=expert.device, dtype=expert_s.dtype)
    offs = torch.searchsorted(expert_s, bounds, out_int32=True)
    d_out = (w1 if w2 is None else w2).shape[-1]
    if backend == "grouped_mm":
        x, w1, b1, w2, b2 = _align_for_grouped_mm(x, w1, b1, w2, b2, activation)
    out, _ = _expert_ffn(
        x, src.index_select(0, order), dst.index_select(0, order), expert_s,
        gate.float().index_select(0, order), offs, w1, b1, w2, b2,
        activation, n_out, backend, skipped,
    )  # fmt: skip
    return out if out.shape[1] == d_out else out[:, :d_out]
