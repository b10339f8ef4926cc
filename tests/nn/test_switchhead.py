"""SwitchHead attention: a dense restatement of the formula, layout, causality, dispatch.

Fast-vs-loop tolerance (max error relative to the loop's max |value|, forward and all
gradients): fp32 1e-5, bf16 autocast 3e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blockdsl.nn import aux
from blockdsl.nn.rope import apply_rope
from blockdsl.nn.switchhead import SwitchHeadAttention

from .test_moe import _grads_vs_loop


def _dense_gates(logits: torch.Tensor, k: int) -> torch.Tensor:
    s = logits.sigmoid()
    top_s, top_i = s.topk(k, -1)
    return torch.zeros_like(s).scatter(-1, top_i, top_s)


def _reference(m: SwitchHeadAttention, x: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
    """Every expert computed densely, unselected ones gated by 0; plain masked softmax."""
    b, t, d = x.shape
    h, e, dh = m.heads, m.experts, m.head_dim
    q, k = (xn @ m.qk.weight.t()).view(b, t, 2, h, dh).permute(2, 0, 3, 1, 4)
    q, k = q * dh**-0.25, k * dh**-0.25
    q, k = apply_rope(q, fraction=0.5), apply_rope(k, fraction=0.5)
    if e == 1:
        v = (x @ m.v.permute(0, 2, 1).reshape(h * dh, d).t()).view(b, t, h, dh)
    else:
        gv = _dense_gates((xn @ m.sel_v.t()).view(b, t, h, e), m.k)
        v_all = torch.einsum("btd,hedk->bthek", x, m.v.view(h, e, d, dh))
        v = (gv.unsqueeze(-1) * v_all).sum(3)
    scores = q @ k.transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    att = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)  # [B, T, H, dh]
    if e == 1:
        att = att * torch.sigmoid(xn @ m.sel_o.t()).unsqueeze(-1)
        return att.reshape(b, t, h * dh) @ m.o.reshape(h * dh, d)
    go = _dense_gates((xn @ m.sel_o.t()).view(b, t, h, e), m.k)
    o_all = torch.einsum("bthk,hekd->bthed", att, m.o.view(h, e, dh, d))
    return (go.unsqueeze(-1) * o_all).sum((2, 3))


@pytest.mark.parametrize("experts", [1, 4])
def test_matches_dense_reference(experts):
    torch.manual_seed(0)
    m = SwitchHeadAttention(16, 2, 8, experts, k=2)
    x, xn = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    torch.testing.assert_close(m(x, xn), _reference(m, x, xn), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m(x), m(x, x))  # no x_norm: everything reads x


@pytest.mark.parametrize("experts", [1, 3])
def test_causal(experts):
    torch.manual_seed(0)
    m = SwitchHeadAttention(16, 2, 8, experts)
    x = torch.randn(2, 6, 16)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 16)
    torch.testing.assert_close(m(x)[:, :4], m(x2)[:, :4], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["bmm", "sort", "grouped_mm"])
def test_fast_dispatch_matches_loop(impl, dtype):
    _grads_vs_loop(lambda: SwitchHeadAttention(16, 2, 8, 4, k=2), impl, dtype, shape=(2, 6, 16))


def test_parameter_counts():
    d, h, dh, e = 16, 2, 8, 4
    moe = SwitchHeadAttention(d, h, dh, e)
    assert sum(p.numel() for p in moe.parameters()) == 2 * h * dh * d + 2 * h * e * d * dh + 2 * h * e * d
    dense = SwitchHeadAttention(d, h, dh, 1)
    assert dense.sel_v is None and tuple(dense.sel_o.shape) == (h, d)
    assert sum(p.numel() for p in dense.parameters()) == 4 * h * dh * d + h * d


def test_entropy_regulariser_per_head_v_and_o():
    torch.manual_seed(0)
    m = SwitchHeadAttention(16, 2, 8, 4, entropy_weight=0.001)
    x = torch.randn(2, 5, 16)
    with aux.collect() as col:
        m(x)
    expected = 0.0
    for sel in (m.sel_v, m.sel_o):
        marg = F.softmax((x @ sel.t()).view(2, 5, 2, 4), -1).mean(1)  # [B, H, E]
        expected = expected - 0.001 * (-(marg * marg.log()).sum(-1).mean())
    torch.testing.assert_close(col.finalize()["entropy_attn"], expected)
    with aux.collect() as col:
        SwitchHeadAttention(16, 2, 8, 1)(x)
    assert col.finalize() == {}


def test_invalid_k():
    with pytest.raises(ValueError, match="k=5 with experts=4"):
        SwitchHeadAttention(16, 2, 8, 4, k=5)
    SwitchHeadAttention(16, 2, 8, 1, k=2)  # k unused with a single expert
