"""The custom op `blockdsl::expert_ffn` (and its backward op) around the "sort" and "grouped_mm"
bodies, so `torch.compile` traces a model around the data-dependent expert loop."""

from __future__ import annotations

import torch
from torch import Tensor

from blockdsl.nn.dispatch.grouped import _grouped_backward, _grouped_forward
from blockdsl.nn.dispatch.sort import _sort_backward, _sort_forward


@torch.library.custom_op("blockdsl::expert_ffn", mutates_args=())
def _expert_ffn(
    x: Tensor, src: Tensor, dst: Tensor, expert: Tensor, gate: Tensor, offs: Tensor,
    w1: Tensor, b1: Tensor | None, w2: Tensor | None, b2: Tensor | None,
    activation: str, n_out: int, backend: str, skipped: bool,
) -> tuple[Tensor, Tensor]:  # (annotations are the op's schema: torch.library reads them)
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
    grad_out: Tensor, x: Tensor, src: Tensor, dst: Tensor, expert: Tensor, gate: Tensor,
    offs: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor | None, b2: Tensor | None,
    h: Tensor, activation: str, backend: str, skipped: bool,
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
