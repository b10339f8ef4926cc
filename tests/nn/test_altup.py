"""AltUp: identity at K = 1, K² + K scalars per wrapped position, selection, modes, math."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from blockdsl.nn.altup import AltUp, narrow, widen
from blockdsl.nn.attention import MultiHeadAttention
from blockdsl.nn.ffn import FeedForward
from blockdsl.nn.norm import make_norm

D = 16


class Residual(nn.Module):
    """A pre-norm residual layer: attention then FFN, residuals included."""

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.n1, self.n2 = make_norm("rmsnorm", d), make_norm("rmsnorm", d)
        self.attn = MultiHeadAttention(d, 2, causal=True, rope=True)
        self.ffn = FeedForward(d, 2 * d, activation="swiglu")

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.ffn(self.n2(x))


class Recorder(nn.Module):
    """Returns its input unchanged and remembers what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.detach().clone())
        return x


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_k1_is_exactly_the_stack() -> None:
    torch.manual_seed(0)
    a, b = Residual(), Residual()
    layers = [a, b, a]  # `a` shared at positions 0 and 2
    x = torch.randn(2, 5, D)
    ref = x
    for layer in layers:
        ref = layer(ref)
    alt = AltUp(layers, K=1)
    for mode in ("recycled", "wide"):
        out = alt.narrow(alt(alt.widen(x, mode)), mode)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_parameter_count(K: int) -> None:
    a, b = Residual(), Residual()
    layers = [a, b, a, b, a]
    alt = AltUp(layers, K=K)
    assert len(alt.layers) == 5
    assert alt.predict.shape == (5, K, K) and alt.correct.shape == (5, K)
    assert n_params(alt) == n_params(a) + n_params(b) + 5 * (K * K + K)
    assert torch.equal(alt.predict[3], torch.eye(K)) and torch.equal(alt.correct, torch.ones(5, K))


def test_forward_matches_equations() -> None:
    torch.manual_seed(0)
    K, L = 3, 4
    layers = [Residual() for _ in range(L)]
    alt = AltUp(layers, K=K)
    with torch.no_grad():
        alt.predict.normal_()
        alt.correct.normal_()
    xs = torch.randn(K, 2, 4, D)
    ref = xs
    for i, layer in enumerate(layers):
        j = i % K
        x_hat = torch.einsum("kj,jbtd->kbtd", alt.predict[i], ref)
        delta = layer(x_hat[j]) - x_hat[j]
        ref = x_hat + alt.correct[i][:, None, None, None] * delta
    torch.testing.assert_close(alt(xs), ref, atol=1e-5, rtol=1e-5)


def test_gradients_reach_predict_and_correct() -> None:
    torch.manual_seed(0)
    layer = Residual()
    alt = AltUp([layer, layer, layer], K=2)
    alt.narrow(alt(alt.widen(torch.randn(2, 5, D)))).square().mean().backward()
    assert alt.predict.grad is not None and alt.predict.grad.abs().sum() > 0
    assert alt.correct.grad is not None and alt.correct.grad.abs().sum() > 0
    assert layer.attn.qkv.weight.grad is not None
    # distinct blocks in: every predict entry gets signal
    alt.zero_grad()
    alt.narrow(alt(alt.widen(torch.randn(2, 5, 2 * D), "wide")), "wide").pow(3).sum().backward()
    assert (alt.predict.grad != 0).all() and (alt.correct.grad != 0).all()


@pytest.mark.parametrize(("selection", "K"), [("alternating", 3), ("alternating", 2), ("same", 3)])
def test_block_selection(selection: str, K: int) -> None:
    rec = Recorder()
    alt = AltUp([rec] * 5, K=K, selection=selection)
    # Block k is filled with k; an identity layer leaves every block as it was.
    xs = torch.arange(K, dtype=torch.float32).view(K, 1, 1, 1).expand(K, 1, 2, 4).contiguous()
    out = alt(xs)
    assert torch.equal(out, xs)
    seen = [int(t.flatten()[0]) for t in rec.seen]
    expect = [i % K for i in range(5)] if selection == "alternating" else [0] * 5
    assert seen == expect == [alt.active_block(i) for i in range(5)]


def test_widen_narrow_modes() -> None:
    x = torch.randn(2, 3, D)
    xs = widen(x, 4)
    assert xs.shape == (4, 2, 3, D) and all(torch.equal(b, x) for b in xs)
    torch.testing.assert_close(narrow(xs), 4 * x)
    wide = torch.randn(2, 3, 4 * D)
    blocks = widen(wide, 4, "wide")
    assert blocks.shape == (4, 2, 3, D)
    assert torch.equal(blocks[1], wide[..., D : 2 * D])
    assert torch.equal(narrow(blocks, "wide"), wide)
    with pytest.raises(ValueError, match="K=3"):
        widen(wide, 3, "wide")
    with pytest.raises(ValueError, match="mode"):
        narrow(xs, "sequence")


def test_validation() -> None:
    with pytest.raises(ValueError, match="blocks on dim 0"):
        AltUp([Recorder()], K=2)(torch.randn(3, 1, 2, 4))
    with pytest.raises(ValueError, match="selection"):
        AltUp([Recorder()], K=2, selection="random")
    with pytest.raises(ValueError, match="K >= 1"):
        AltUp([Recorder()], K=0)


def test_bf16_stream() -> None:
    torch.manual_seed(0)
    alt = AltUp([Residual(), Residual()], K=2).to(torch.bfloat16)
    out = alt(widen(torch.randn(1, 4, D, dtype=torch.bfloat16), 2))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 4, D)
