"""MoE FFN layers: routing invariants, losses, parameter layout, and fast == loop dispatch.

Fast-vs-loop tolerance (max error relative to the loop's max |value|, forward and all
gradients incl. the router): fp32 1e-5, bf16 autocast 3e-2.
"""

from __future__ import annotations

import math

import pytest
import torch

from blockdsl.nn import aux
from blockdsl.nn.moe import ExpertChoiceMoE, SigmaMoE, TopKMoE

from .test_dispatch import TOL, assert_rel_close

FAST = ("fused", "bmm", "sort", "grouped_mm")


def _grads_vs_loop(make, impl: str, dtype: torch.dtype, shape=(3, 8, 16)) -> None:
    """Same module, same input: `impl` and "loop" agree on output and every gradient."""
    results = []
    for which in ("loop", impl):
        torch.manual_seed(0)
        m = make()
        m.dispatch = which
        g = torch.Generator().manual_seed(1)
        x = torch.randn(*shape, generator=g, requires_grad=True)
        x_norm = torch.randn(*shape, generator=g, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            with aux.collect() as col:
                y = m(x, x_norm)
            loss = (y.float() * torch.randn(y.shape, generator=g)).sum()
            loss = loss + sum(col.finalize().values(), torch.zeros(()))
        loss.backward()
        grads = {"x": x.grad, "x_norm": x_norm.grad}
        grads.update({n: p.grad for n, p in m.named_parameters()})
        results.append((y.detach(), grads))
    (ref, ref_g), (out, out_g) = results
    assert_rel_close(out, ref, TOL[dtype], "forward")
    for name, g in ref_g.items():
        assert g is not None and out_g[name] is not None, name
        assert_rel_close(out_g[name], g, TOL[dtype], f"grad {name}")


ROUTINGS = {
    "topk_dropless": lambda: TopKMoE(16, 24, 4, 2, balance_weight=0.01, z_weight=1e-3),
    "topk_capacity": lambda: TopKMoE(16, 24, 4, 2, capacity_factor=0.6, shared_d_ff=8),
    "topk_swiglu_renorm": lambda: TopKMoE(16, 24, 5, 2, "swiglu", False, renormalize=True),
    "ec_batch": lambda: ExpertChoiceMoE(16, 24, 4, capacity_factor=1.5),
    "ec_position": lambda: ExpertChoiceMoE(16, 24, 4, 2.0, "geglu", group="position"),
    "sigma": lambda: SigmaMoE(16, 8, 6, 2, entropy_weight=0.01),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_fast_dispatch_matches_loop(routing, impl, dtype):
    _grads_vs_loop(ROUTINGS[routing], impl, dtype)


def test_capacity_drops_tokens_with_gate_0_and_drop_count():
    m = TopKMoE(16, 24, 4, 2, capacity_factor=0.6)
    x = torch.randn(3, 8, 16)
    _, expert, _, skipped = m.route(x.reshape(-1, 16))
    cap = m.capacity(24)
    assert cap == int(24 * 0.6 * 2 / 4) and skipped
    counts = torch.bincount(expert, minlength=5)
    assert (counts[:4] <= cap).all() and counts[4] > 0  # some dropped (id 4)


def _steered(first: list[int], second: list[int], e: int = 4) -> torch.Tensor:
    """Router inputs making token n choose first[n] then second[n] (router = identity)."""
    logits = torch.zeros(len(first), e)
    for n, (a, b) in enumerate(zip(first, second, strict=True)):
        logits[n, a], logits[n, b] = 3.0, 2.0
    return logits


def _identity_router(m: TopKMoE) -> TopKMoE:
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(m.experts, m.d))
    return m


def test_first_choices_fill_capacity_before_second_choices():
    # tokens 0..7: first e1, second e0; tokens 8..15: first e0, second e1. C = 8.
    m = _identity_router(TopKMoE(4, 8, 4, 2, capacity_factor=1.0))
    sel = _steered([1] * 8 + [0] * 8, [0] * 8 + [1] * 8)
    token, expert, _, _ = m.route(sel)
    rank = torch.arange(32) // 16
    assert m.capacity(16) == 8
    for e in (0, 1):
        kept = expert == e
        assert kept.sum() == 8
        assert (rank[kept] == 0).all()  # only first choices kept, though second ones are earlier
    assert set(token[expert == 0].tolist()) == set(range(8, 16))


def test_dropped_tokens_output_zero():
    # C = 4: e1 keeps tokens 0-3, e0 keeps first choices of 8-11; tokens 4-7, 12-15 lose both.
    m = _identity_router(TopKMoE(4, 8, 4, 2, bias=True, capacity_factor=0.5))
    sel = _steered([1] * 8 + [0] * 8, [0] * 8 + [1] * 8).view(1, 16, 4)
    y = m(torch.randn(1, 16, 4), x_norm=sel)[0]
    dropped = [*range(4, 8), *range(12, 16)]
    assert torch.equal(y[dropped], torch.zeros(8, 4))
    assert (y[[0, 1, 2, 3, 8, 9, 10, 11]].abs().sum(-1) > 0).all()


def test_balance_and_z_loss_hand_computed():
    m = _identity_router(TopKMoE(2, 4, 2, 1, balance_weight=0.5, z_weight=0.1))
    rows = [[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]]
    with aux.collect() as col:
        m(torch.zeros(1, 4, 2), x_norm=torch.tensor([rows]))
    losses = col.finalize()
    p0 = [1 / (1 + math.exp(-(a - b))) for a, b in rows]
    f = [3 / 4, 1 / 4]  # top-1: e0, e1, e0, e0
    big_p = [sum(p0) / 4, 1 - sum(p0) / 4]
    assert losses["balance"].item() == pytest.approx(0.5 * 2 * (f[0] * big_p[0] + f[1] * big_p[1]))
    lse = [math.log(math.exp(a) + math.exp(b)) for a, b in rows]
    assert losses["z"].item() == pytest.approx(0.1 * sum(v * v for v in lse) / 4)


def test_weight_zero_losses_not_recorded():
    with aux.collect() as col:
        TopKMoE(8, 8, 4, 2)(torch.randn(1, 3, 8))
    assert col.finalize() == {}


def test_topk_matches_dense_formula():
    """Dropless top-k == sum over all experts with a dense gate matrix (router reads x_norm)."""
    torch.manual_seed(0)
    m = TopKMoE(8, 12, 4, 2, activation="gelu", renormalize=True, shared_d_ff=4)
    x, xn = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    probs = (xn @ m.router.weight.t()).softmax(-1)
    top_p, top_i = probs.topk(2, -1)
    dense = torch.zeros_like(probs).scatter(-1, top_i, top_p / top_p.sum(-1, keepdim=True))
    h = torch.nn.functional.gelu(torch.einsum("btd,edf->btef", x, m.w1) + m.b1)
    y = torch.einsum("btef,efd->bted", h, m.w2) + m.b2
    ref = (dense.unsqueeze(-1) * y).sum(2) + m.shared(x)
    torch.testing.assert_close(m(x, xn), ref, rtol=1e-5, atol=1e-5)


def test_expert_dropout_and_noise_only_in_training():
    torch.manual_seed(0)
    m = TopKMoE(8, 8, 4, 3, router_noise=1.0, expert_dropout=0.9)
    x = torch.randn(2, 6, 8)
    m.eval()
    y_eval = m(x)
    plain = TopKMoE(8, 8, 4, 3)
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(y_eval, plain.eval()(x))
    m.train()
    for seed in range(20):  # p = 0.9: usually < 3 experts survive; never 0, never NaN
        torch.manual_seed(seed)
        token, expert, gate, skipped = m.route(x.reshape(-1, 8))
        assert skipped and (expert < 4).any()
        assert torch.isfinite(m(x)).all()


@pytest.mark.parametrize("group", ["batch", "position"])
def test_expert_choice_each_expert_exactly_c(group):
    b, t, e = 4, 6, 3
    m = ExpertChoiceMoE(8, 8, e, capacity_factor=1.5, group=group)
    token, expert, _ = m.route(torch.randn(b * t, 8), b, t)
    size = b * t if group == "batch" else b
    c = m.capacity(size)
    assert c == math.ceil(size * 1.5 / e)
    groups = 1 if group == "batch" else t
    assert torch.equal(torch.bincount(expert, minlength=e), torch.full((e,), c * groups))
    if group == "position":  # each (expert, position) holds exactly C distinct batch rows
        for ex in range(e):
            pos = token[expert == ex] % t
            assert torch.equal(torch.bincount(pos, minlength=t), torch.full((t,), c))
    pairs = set(zip(token.tolist(), expert.tolist(), strict=True))
    assert len(pairs) == len(token)  # an expert takes a token at most once
    assert ExpertChoiceMoE(8, 8, 2, 8.0).capacity(3) == 3  # clamped to the group size


def test_expert_choice_position_group_is_causal_batch_group_is_not():
    torch.manual_seed(0)
    b, t = 4, 6
    x = torch.randn(b, t, 8)
    x2 = x.clone()
    x2[:, 3:] = torch.randn(b, t - 3, 8) * 5  # change only the future (positions >= 3)
    pos = ExpertChoiceMoE(8, 8, 4, capacity_factor=1.0, group="position")
    torch.testing.assert_close(pos(x)[:, :3], pos(x2)[:, :3], rtol=0, atol=1e-6)
    bat = ExpertChoiceMoE(8, 8, 4, capacity_factor=1.0, group="batch")
    bat.load_state_dict(pos.state_dict())
    assert not torch.allclose(bat(x)[:, :3], bat(x2)[:, :3])  # the test can see leakage


def test_sigma_moe_matches_dense_formula_and_reads_x_norm():
    torch.manual_seed(0)
    m = SigmaMoE(8, 4, 6, 2)
    x, xn = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    s = torch.sigmoid(xn @ m.selector.t())
    top_s, top_i = s.topk(2, -1)
    dense = torch.zeros_like(s).scatter(-1, top_i, top_s)
    h = torch.relu(torch.einsum("btd,edf->btef", x, m.keys))
    ref = (dense.unsqueeze(-1) * torch.einsum("btef,efd->bted", h, m.values)).sum(2)
    torch.testing.assert_close(m(x, xn), ref, rtol=1e-5, atol=1e-6)


def test_sigma_moe_entropy_pools_applications():
    torch.manual_seed(0)
    m = SigmaMoE(8, 4, 6, 2, entropy_weight=0.01)
    x1, x2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with aux.collect() as col:
        m(x1)
        m(x2)
    lp = torch.cat([(x @ m.selector.t()).log_softmax(-1) for x in (x1, x2)], dim=1)
    marg = lp.exp().mean(1)  # [B, E]
    h = -(marg * marg.log()).sum(-1).mean()
    torch.testing.assert_close(col.finalize()["entropy_ffn"], -0.01 * h)


def test_sigma_moe_expert_dropout_gates_are_unmasked_scores():
    torch.manual_seed(0)
    m = SigmaMoE(8, 4, 6, 5, expert_dropout=0.5)
    y = m(torch.randn(2, 5, 8))
    assert torch.isfinite(y).all()


def test_sigma_moe_init():
    m = SigmaMoE(64, 32, 40, 4, n_applications=8)
    scale = math.sqrt(2 / 8)
    assert m.keys.std().item() == pytest.approx(scale / 8, rel=0.05)
    assert m.values.std().item() == pytest.approx(scale / math.sqrt(40 * 32), rel=0.05)
    norms = m.selector.norm(dim=-1)
    torch.testing.assert_close(norms, norms.mean().expand_as(norms))


@pytest.mark.parametrize(
    "make,expected",
    [
        # router d E + w1 E d g f + w2 E f d + biases E (g f + d) + shared FFN
        (lambda: TopKMoE(16, 24, 4, 2), 16 * 4 + 4 * 16 * 24 * 2 + 4 * (24 + 16)),
        (lambda: TopKMoE(16, 24, 4, 2, "swiglu", False), 16 * 4 + 4 * 16 * 24 * 3),
        (
            lambda: TopKMoE(16, 24, 4, 1, shared_d_ff=8),
            16 * 4 + 4 * 16 * 24 * 2 + 4 * 40 + (16 * 8 * 2 + 8 + 16),
        ),
        (lambda: ExpertChoiceMoE(16, 24, 4, activation="geglu"), 16 * 4 + 4 * (16 * 24 * 3 + 48 + 16)),
        # keys E d g es + values E es d + selector E d
        (lambda: SigmaMoE(16, 8, 6, 2), 6 * 16 * 8 * 2 + 6 * 16),
    ],
)
def test_parameter_counts(make, expected):
    assert sum(p.numel() for p in make().parameters()) == expected


def test_invalid_arguments_raise_clearly():
    with pytest.raises(ValueError, match="k=5 with experts=4"):
        TopKMoE(8, 8, 4, 5)
    with pytest.raises(ValueError, match="k=7 with experts=6"):
        SigmaMoE(8, 4, 6, 7)
    with pytest.raises(ValueError, match="unknown expert-choice group"):
        ExpertChoiceMoE(8, 8, 4, group="sequence")
    with pytest.raises(ValueError, match="unknown dispatch"):
        TopKMoE(8, 8, 4, 2, dispatch="triton")


@pytest.mark.compile
@pytest.mark.parametrize("dispatch", ["sort", "bmm"])
def test_compiled_topk_matches_eager(dispatch):
    torch.manual_seed(0)
    m = TopKMoE(16, 32, 4, 2, capacity_factor=1.0, balance_weight=0.01, dispatch=dispatch)
    x = torch.randn(2, 8, 16)
    outs = []
    for fn in (m, torch.compile(m, fullgraph=False)):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        with aux.collect() as col:
            y = fn(xi)
        (y.square().sum() + sum(col.finalize().values())).backward()
        outs.append((y.detach(), xi.grad, [p.grad.clone() for p in m.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp1, gp0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("experts", [8, 15, 16, 40])
@pytest.mark.parametrize("log", [False, True])
def test_router_softmax_matches_aten_values_and_grads(experts, log):
    """The router's (log-)softmax (transposed below 16 experts) equals ATen's, forward and back."""
    from blockdsl.nn.moe import _softmax_experts

    g = torch.Generator().manual_seed(experts)
    x0 = torch.randn(37, experts, generator=g) * 3
    up = torch.randn(37, experts, generator=g)
    a = x0.clone().requires_grad_()
    b = x0.clone().requires_grad_()
    ya = _softmax_experts(a, log=log)
    yb = b.log_softmax(-1) if log else b.softmax(-1)
    (ya * up).sum().backward()
    (yb * up).sum().backward()
    assert ya.shape == yb.shape
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("experts,k,renormalize", [(8, 2, False), (8, 2, True), (5, 1, False),
                                                   (16, 4, True), (12, 12, False)])
def test_fused_router_matches_the_tensor_router(experts, k, renormalize):
    """TopKMoE.route's one-pass C++ router (CPU fp32, dispatch auto/fused) against the tensor
    path it replaces (any other dispatch): the same choices in the same rank-major order,
    the same gates, balance loss and gradients into the router input and weight."""
    from blockdsl.nn import aux

    torch.manual_seed(experts + k)
    results = []
    for dispatch in ("auto", "sort"):
        torch.manual_seed(0)
        m = TopKMoE(12, 8, experts, k, renormalize=renormalize, balance_weight=0.1,
                    dispatch=dispatch)
        sel = (torch.randn(50, 12) * 2).requires_grad_()
        with aux.collect() as col:
            token, expert, gate, skipped = m.route(sel)
        loss = (gate * torch.linspace(-1, 1, gate.numel())).sum() + col.finalize()["balance"]
        loss.backward()
        results.append((token, expert, gate.detach(), col.finalize()["balance"].detach(),
                        sel.grad, m.router.weight.grad))
    (t0, e0, g0, b0, s0, w0), (t1, e1, g1, b1, s1, w1) = results
    assert torch.equal(t0, t1) and torch.equal(e0, e1)
    torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b0, b1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s0, s1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w0, w1, rtol=1e-5, atol=1e-6)


def test_fused_router_keeps_expert_dropout_and_capacity_semantics():
    """Expert dropout masks logits before the fused router and capacity drops after it: the
    kept assignments and dropped ones equal the tensor path's (same seeds)."""
    out = []
    for dispatch in ("auto", "loop"):
        torch.manual_seed(3)
        m = TopKMoE(8, 8, 6, 2, capacity_factor=0.8, expert_dropout=0.5, dispatch=dispatch)
        m.train()
        x = torch.randn(2, 20, 8)
        torch.manual_seed(4)
        out.append(m.route(x.reshape(40, 8)))
    (t0, e0, g0, s0), (t1, e1, g1, s1) = out
    assert s0 and s1
    assert torch.equal(e0, e1) and torch.equal(t0, t1)
    torch.testing.assert_close(g0, g1, rtol=1e-6, atol=1e-7)
