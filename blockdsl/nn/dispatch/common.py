"""What every dispatch backend shares: activations with explicit backwards, accumulation
dtypes, per-expert segment helpers and the row-bucketed matmuls. Plain tensor code."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from blockdsl.names import GATE_OF
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
