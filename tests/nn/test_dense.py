"""Dense primitives: RoPE, norms, attention, FFN, stems and heads, checked against hand formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockdsl.nn.attention import MultiHeadAttention
from blockdsl.nn.ffn import ACTIVATIONS, FeedForward, activate, activation_fn, is_gated
from blockdsl.nn.norm import make_norm
from blockdsl.nn.rope import apply_rope
from blockdsl.nn.stems import ClassifierHead, LMHead, PatchEmbedding, TokenEmbedding


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- rope


def test_rope_relative_position() -> None:
    torch.manual_seed(0)
    dh, t = 16, 12
    q, k = torch.randn(dh), torch.randn(dh)
    rq = apply_rope(q.expand(1, 1, t, dh).contiguous())[0, 0]
    rk = apply_rope(k.expand(1, 1, t, dh).contiguous())[0, 0]
    dots = rq @ rk.T  # dots[m, n] = <rope(q, m), rope(k, n)>
    for shift in (1, 3, 7):
        torch.testing.assert_close(dots[shift:, shift:], dots[:-shift, :-shift])
    # Position 0 is the identity; rotation keeps norms.
    torch.testing.assert_close(rq[0], q)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(t))


def test_rope_fraction_and_offset() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 12)
    assert torch.equal(apply_rope(x, fraction=0.0), x)
    part = apply_rope(x, fraction=0.5)  # r = 6 of 12 dims
    assert torch.equal(part[..., 6:], x[..., 6:])
    assert not torch.allclose(part[..., :6], x[..., :6])
    # fraction 0.4 -> int(4.8) = 4 -> r = 4: dims 4.. untouched
    assert torch.equal(apply_rope(x, fraction=0.4)[..., 4:], x[..., 4:])
    # offset = position of the first row
    torch.testing.assert_close(apply_rope(x[..., 4:, :], offset=4), apply_rope(x)[..., 4:, :])
    # Half-split pairs (i, i + r/2): with r = dh = 4 at position 1, dim 0 mixes with dim 2.
    e0 = torch.zeros(1, 1, 2, 4)
    e0[..., 0] = 1.0
    out = apply_rope(e0, base=10000.0)[0, 0, 1]
    assert out[1] == 0 and out[3] == 0
    one = torch.tensor(1.0)  # angle = position 1 x inv_freq[0] = 1 rad
    torch.testing.assert_close(out[[0, 2]], torch.stack([one.cos(), one.sin()]))


def test_rope_dtype_and_grad() -> None:
    x = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    assert apply_rope(x).dtype == torch.bfloat16
    with torch.inference_mode():  # table cached in inference mode must still train later
        apply_rope(torch.randn(1, 1, 7, 8))
    y = torch.randn(1, 1, 7, 8, requires_grad=True)
    apply_rope(y).sum().backward()
    assert y.grad is not None


# --------------------------------------------------------------------------- norm


def test_make_norm() -> None:
    assert n_params(make_norm("layernorm", 10)) == 20
    assert n_params(make_norm("layernorm", 10, bias=False)) == 10
    assert n_params(make_norm("rmsnorm", 10)) == 10
    assert make_norm("layernorm", 4).eps == 1e-5
    assert make_norm("rmsnorm", 4).eps == 1e-6
    assert make_norm("layernorm", 4, eps=1e-6).eps == 1e-6
    with pytest.raises(ValueError, match="batchnorm"):
        make_norm("batchnorm", 4)


# --------------------------------------------------------------------------- attention


def test_attention_param_layout() -> None:
    d, h, kv, dh = 32, 4, 2, 8
    a = MultiHeadAttention(d, h, kv_heads=kv)
    assert a.qkv.weight.shape == ((h + 2 * kv) * dh, d)
    assert n_params(a) == d * (h + 2 * kv) * dh + (h + 2 * kv) * dh + h * dh * d + d
    b = MultiHeadAttention(d, 2, head_dim=24, bias=False)
    assert n_params(b) == d * 6 * 24 + 2 * 24 * d
    assert b(torch.randn(2, 5, d)).shape == (2, 5, d)
    with pytest.raises(ValueError, match="divide"):
        MultiHeadAttention(d, 4, kv_heads=3)
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("rope", [False, True])
def test_sdpa_matches_manual(causal: bool, kv: int, rope: bool) -> None:
    torch.manual_seed(0)
    a = MultiHeadAttention(32, 4, kv_heads=kv, causal=causal, rope=rope, rope_fraction=0.5)
    x = torch.randn(2, 7, 32)
    ref = a(x)
    a.impl = "manual"  # switchable after construction
    torch.testing.assert_close(a(x), ref, atol=1e-5, rtol=1e-5)
    ab = a.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    out_manual = ab(xb)
    ab.impl = "sdpa"
    torch.testing.assert_close(ab(xb).float(), out_manual.float(), atol=3e-2, rtol=3e-2)


def test_unknown_impl_rejected_at_call() -> None:
    a = MultiHeadAttention(8, 2)
    a.impl = "flash3"
    with pytest.raises(ValueError, match="flash3"):
        a(torch.randn(1, 2, 8))


@pytest.mark.parametrize("impl", ["sdpa", "manual", "bmm"])
def test_causal_masking(impl: str) -> None:
    torch.manual_seed(0)
    a = MultiHeadAttention(16, 2, causal=True, rope=True, impl=impl)
    x = torch.randn(1, 9, 16)
    y = x.clone()
    y[:, 5:] += torch.randn(1, 4, 16)
    out_x, out_y = a(x), a(y)
    torch.testing.assert_close(out_x[:, :5], out_y[:, :5], atol=0, rtol=0)
    assert not torch.allclose(out_x[:, 5:], out_y[:, 5:])
    # and without the causal flag the future leaks
    a.causal = False
    assert not torch.allclose(a(x)[:, :5], a(y)[:, :5])


@pytest.mark.parametrize("impl", ["sdpa", "manual", "bmm"])
def test_gqa_equals_repeated_kv_heads(impl: str) -> None:
    torch.manual_seed(0)
    d, h, kv, dh = 24, 6, 2, 4
    g = MultiHeadAttention(d, h, kv_heads=kv, causal=True, rope=True, impl=impl)
    full = MultiHeadAttention(d, h, causal=True, rope=True, impl=impl)
    w, b = g.qkv.weight.detach(), g.qkv.bias.detach()

    def expand(t: Tensor) -> Tensor:
        q, k, v = t.split([h * dh, kv * dh, kv * dh])
        rep = [x.unflatten(0, (kv, dh)).repeat_interleave(h // kv, 0).flatten(0, 1) for x in (k, v)]
        return torch.cat([q, *rep])

    with torch.no_grad():
        full.qkv.weight.copy_(expand(w))
        full.qkv.bias.copy_(expand(b))
        full.out.load_state_dict(g.out.state_dict())
    x = torch.randn(2, 5, d)
    torch.testing.assert_close(g(x), full(x), atol=1e-5, rtol=1e-5)


def test_peri_norm_input() -> None:
    torch.manual_seed(0)
    a = MultiHeadAttention(16, 4, impl="manual")
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(a(x, x_norm=x), a(x), atol=0, rtol=0)
    xn = F.layer_norm(x, (16,))
    # Reference: Q, K from xn and V from x through an explicit module-free computation.
    w, b = a.qkv.weight, a.qkv.bias
    q, k, _ = F.linear(xn, w, b).split(16, dim=-1)
    v = F.linear(x, w, b)[..., 32:]
    heads = [t.unflatten(-1, (4, 4)).transpose(1, 2) for t in (q, k, v)]
    att = (heads[0] @ heads[1].transpose(-1, -2) / 2.0).softmax(-1) @ heads[2]
    ref = a.out(att.transpose(1, 2).flatten(2))
    torch.testing.assert_close(a(x, x_norm=xn), ref, atol=1e-5, rtol=1e-5)
    a.impl = "sdpa"
    torch.testing.assert_close(a(x, x_norm=xn), ref, atol=1e-5, rtol=1e-5)


def test_attention_gradients_and_dropout() -> None:
    torch.manual_seed(0)
    a = MultiHeadAttention(16, 4, kv_heads=2, causal=True, dropout=0.5)
    x = torch.randn(2, 5, 16, requires_grad=True)
    a(x).square().sum().backward()
    assert x.grad is not None and a.qkv.weight.grad is not None
    assert a.qkv.weight.grad.abs().sum() > 0 and a.out.bias.grad.abs().sum() > 0
    a.eval()  # dropout off in eval: deterministic
    assert torch.equal(a(x), a(x))


# --------------------------------------------------------------------------- ffn


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_ffn_params_and_shape(act: str) -> None:
    d, f = 12, 20
    m = FeedForward(d, f, activation=act)
    k = 2 if is_gated(act) else 1
    assert n_params(m) == d * k * f + k * f + f * d + d
    assert n_params(FeedForward(d, f, activation=act, bias=False)) == d * k * f + f * d
    x = torch.randn(3, 4, d)
    assert m(x, x_norm=torch.randn(3, 4, d)).shape == (3, 4, d)
    torch.testing.assert_close(m(x, x_norm=x * 0), m(x))


def test_ffn_values() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    m = FeedForward(8, 6, activation="swiglu")
    gate, up = m.w_in(x)[:, :6], m.w_in(x)[:, 6:]
    torch.testing.assert_close(m(x), m.w_out(F.silu(gate) * up))
    g = FeedForward(8, 6, activation="geglu")
    h = g.w_in(x)
    torch.testing.assert_close(g(x), g.w_out(F.gelu(h[:, :6]) * h[:, 6:]))
    # exact vs tanh GELU are different functions
    z = torch.linspace(-3, 3, 101)
    assert not torch.allclose(activation_fn("gelu")(z), activation_fn("gelu_tanh")(z), atol=1e-5)
    torch.testing.assert_close(activation_fn("gelu")(z), 0.5 * z * (1 + torch.erf(z / 2**0.5)))
    torch.testing.assert_close(
        activate(torch.tensor([[-1.0, 2.0, 3.0, 4.0]]), "reglu"), torch.tensor([[0.0, 8.0]])
    )
    assert activation_fn("swiglu") is F.silu
    with pytest.raises(ValueError, match="tanh"):
        FeedForward(4, 4, activation="tanh")


# --------------------------------------------------------------------------- stems


def test_token_embedding() -> None:
    e = TokenEmbedding(50, 8, max_len=6)
    assert n_params(e) == 50 * 8 + 6 * 8
    tok = torch.randint(0, 50, (2, 6))
    out = e(tok)
    assert out.shape == (2, 6, 8)
    torch.testing.assert_close(out, e.tok.weight[tok] + e.pos.weight[:6])
    with pytest.raises(ValueError, match="max_len=6"):
        e(torch.randint(0, 50, (2, 7)))
    nopos = TokenEmbedding(50, 8)
    assert nopos.pos is None and n_params(nopos) == 400
    assert nopos(torch.randint(0, 50, (1, 100))).shape == (1, 100, 8)


@pytest.mark.parametrize(
    ("cls", "extra", "tokens"), [("learned", 1, 17), ("zero", 0, 17), ("none", 0, 16)]
)
def test_patch_embedding(cls: str, extra: int, tokens: int) -> None:
    p = PatchEmbedding(image=16, patch=4, channels=3, d=8, cls=cls)
    assert p.num_tokens == tokens
    assert n_params(p) == 3 * 16 * 8 + 8 + extra * 8 + tokens * 8
    out = p(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, tokens, 8)
    if cls == "zero":
        torch.testing.assert_close(out[:, 0], p.pos[0, 0].expand(2, 8))
    assert n_params(PatchEmbedding(16, 4, 3, 8, cls=cls, pos="none")) == 3 * 16 * 8 + 8 + extra * 8
    with pytest.raises(ValueError, match="multiple"):
        PatchEmbedding(15, 4, 3, 8)


def test_lm_head_tied_and_untied() -> None:
    emb = TokenEmbedding(30, 8)
    tied = LMHead(8, 30, tied=emb.tok)
    assert n_params(tied) == 0
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(tied(x), x @ emb.tok.weight.T)
    assert n_params(LMHead(8, 30, bias=True, tied=emb.tok)) == 30
    untied = LMHead(8, 30, bias=True)
    assert n_params(untied) == 8 * 30 + 30 and untied(x).shape == (2, 3, 30)
    # A model holding both counts the shared matrix once and trains it from both ends.
    model = nn.ModuleDict({"stem": emb, "head": tied})
    assert n_params(model) == 30 * 8
    tied(emb(torch.randint(0, 30, (1, 4)))).sum().backward()
    assert emb.tok.weight.grad is not None
    with pytest.raises(ValueError, match="tied"):
        LMHead(8, 31, tied=emb.tok)


def test_classifier_head() -> None:
    x = torch.randn(2, 5, 8)
    h = ClassifierHead(8, 3)
    assert n_params(h) == 8 * 3 + 3
    torch.testing.assert_close(h(x), h.fc(x[:, 0]))
    gap = ClassifierHead(8, 3, pool="gap")
    torch.testing.assert_close(gap(x), gap.fc(x[:, 1:].mean(1)))
    gap_all = ClassifierHead(8, 3, pool="gap", has_cls_token=False)
    torch.testing.assert_close(gap_all(x), gap_all.fc(x.mean(1)))
    pre = ClassifierHead(8, 3, pre_logits=6)
    assert n_params(pre) == 8 * 6 + 6 + 6 * 3 + 3
    torch.testing.assert_close(pre(x), pre.fc(torch.tanh(pre.pre(x[:, 0]))))
    with pytest.raises(ValueError, match="class token"):
        ClassifierHead(8, 3, pool="cls", has_cls_token=False)


# --------------------------------------------------------------------------- whole models


class PreLNBlock(nn.Module):
    """x + attn(norm(x)); x + ffn(norm(x)) -- the GPT-2 / ViT layer."""

    def __init__(self, d: int, heads: int, d_ff: int, act: str, causal: bool, eps: float):
        super().__init__()
        self.n1, self.n2 = make_norm("layernorm", d, eps), make_norm("layernorm", d, eps)
        self.attn = MultiHeadAttention(d, heads, causal=causal)
        self.ffn = FeedForward(d, d_ff, activation=act)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.ffn(self.n2(x))


def vit(d: int, layers: int, heads: int, d_ff: int, image: int, patch: int, classes: int):
    return nn.Sequential(
        PatchEmbedding(image, patch, 3, d),
        *[PreLNBlock(d, heads, d_ff, "gelu", False, 1e-6) for _ in range(layers)],
        make_norm("layernorm", d, 1e-6),
        ClassifierHead(d, classes),
    )


def gpt(vocab: int, ctx: int, d: int, layers: int, heads: int) -> nn.Sequential:
    stem = TokenEmbedding(vocab, d, max_len=ctx)
    return nn.Sequential(
        stem,
        *[PreLNBlock(d, heads, 4 * d, "gelu_tanh", True, 1e-5) for _ in range(layers)],
        make_norm("layernorm", d),
        LMHead(d, vocab, tied=stem.tok),
    )


def test_vit_b16_parameter_count() -> None:
    with torch.device("meta"):
        model = vit(768, 12, 12, 3072, 224, 16, 1000)
    assert n_params(model) == 86_567_656


def test_gpt2_small_parameter_count() -> None:
    with torch.device("meta"):
        model = gpt(50257, 1024, 768, 12, 12)
    assert n_params(model) == 124_439_808


def test_tiny_models_run() -> None:
    torch.manual_seed(0)
    v = vit(16, 2, 2, 32, 8, 4, 5)
    assert v(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    g = gpt(20, 8, 16, 2, 2)
    logits = g(torch.randint(0, 20, (2, 8)))
    assert logits.shape == (2, 8, 20)
    F.cross_entropy(logits.flatten(0, 1), torch.randint(0, 20, (16,))).backward()
    assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv", [4, 2])
def test_bmm_attention_matches_manual_with_gradients(causal: bool, kv: int) -> None:
    """The hand-written backward equals autograd through the reference ops: fp32 to 1e-5,
    bf16 autocast (fp32 weights) to 3e-2 of each tensor's max, the tune tolerances."""
    torch.manual_seed(0)
    ref = MultiHeadAttention(32, 4, kv_heads=kv, causal=causal, rope=True, impl="manual")
    fast = MultiHeadAttention(32, 4, kv_heads=kv, causal=causal, rope=True, impl="bmm")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 11, 32)
    for dtype, tol in ((None, 1e-5), (torch.bfloat16, 3e-2)):
        outs = []
        for m in (ref, fast):
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                y = m(xi)
            (y.float() * torch.linspace(-1, 1, 32)).sum().backward()
            outs.append([t.detach().float() for t in (y, xi.grad, m.qkv.weight.grad, m.out.weight.grad)])
        for a, b in zip(*outs):
            assert float((a - b).abs().max()) <= tol * float(b.abs().max()), (dtype, causal, kv)


@pytest.mark.parametrize("causal", [False, True])
def test_bmm_attention_gradcheck(causal: bool) -> None:
    from blockdsl.nn.attention import _BmmAttention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: _BmmAttention.apply(a, b, c, causal), (q, k, v))


def test_bmm_attention_with_dropout_falls_back_to_the_reference() -> None:
    torch.manual_seed(0)
    a = MultiHeadAttention(16, 4, causal=True, dropout=0.5, impl="bmm")
    x = torch.randn(2, 5, 16)
    torch.manual_seed(1)
    y = a(x)
    a.impl = "manual"
    torch.manual_seed(1)
    torch.testing.assert_close(a(x), y, atol=0, rtol=0)
    a.eval()
    a.impl = "bmm"
    out_eval = a(x)
    a.impl = "sdpa"
    torch.testing.assert_close(a(x), out_eval, atol=1e-5, rtol=1e-5)


def test_rmsnorm_under_bf16_autocast_takes_the_fused_kernel_without_a_warning():
    """An fp32 weight meets a bf16 input under autocast: the weight is cast, not the kernel
    dropped (torch warns "Mismatch dtype" and runs its composite otherwise); same values."""
    import warnings

    from blockdsl.nn.norm import make_norm

    torch.manual_seed(0)
    ours, ref = make_norm("rmsnorm", 16), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 16).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(x)
    assert y.dtype == torch.bfloat16 and ours.weight.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(x)
    torch.testing.assert_close(y.float(), expected.float(), rtol=0, atol=0)
    y.float().sum().backward()
    assert ours.weight.grad is not None and ours.weight.grad.dtype == torch.float32
