"""The fast dispatch backends against the per-expert loop reference.

Tolerances (max |fast - loop| relative to max |loop|, forward and every gradient):
fp32 1e-5; bf16 autocast 3e-2 (the backends round bf16 intermediates at different points).
"""

from __future__ import annotations

import pytest
import torch

from blockdsl.nn import dispatch
from blockdsl.nn.dispatch import expert_mixture, resolve_impl

FAST = ("bmm", "sort", "grouped_mm")
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item() + 1e-12
    assert err <= tol * scale, f"{what}: max err {err:.3g} > {tol} * {scale:.3g}"


def _case(two_layer: bool, act: str, bias: bool, skipped: bool, d: int = 12, f: int = 20):
    g = torch.Generator().manual_seed(0)
    n, m, e, n_out = 9, 24, 5, 7
    width = 2 * f if act in ("swiglu", "geglu", "reglu") else f
    t = {
        "x": torch.randn(n, d, generator=g),
        "gate": torch.rand(m, generator=g),
        "w1": torch.randn(e, d, width if two_layer else f, generator=g) / d**0.5,
    }
    if bias:
        t["b1"] = torch.randn(e, t["w1"].shape[-1], generator=g)
    if two_layer:
        t["w2"] = torch.randn(e, f, d, generator=g) / f**0.5
        if bias:
            t["b2"] = torch.randn(e, d, generator=g)
    src = torch.randint(0, n, (m,), generator=g)
    expert = torch.randint(0, e - 1, (m,), generator=g)  # expert e - 1 stays empty
    if skipped:
        expert[::4] = e
    dst = torch.randint(0, n_out, (m,), generator=g)
    grad = torch.randn(n_out, d if two_layer else f, generator=g)
    return t, src, expert, dst, n_out, grad


def _run(impl, case, act, dtype, skipped):
    t, src, expert, dst, n_out, grad = case
    leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = expert_mixture(
            leaves["x"], src, expert, leaves["gate"], leaves["w1"], leaves.get("b1"),
            leaves.get("w2"), leaves.get("b2"), activation=act if "w2" in t else "none",
            dst=dst, n_out=n_out, impl=impl, skipped=skipped,
        )  # fmt: skip
    (out.float() * grad).sum().backward()
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "two_layer,act,bias,skipped",
    [
        (True, "gelu", True, False),
        (True, "swiglu", False, False),
        (True, "relu", True, True),
        (True, "geglu", True, True),
        (False, "none", True, False),
        (False, "none", False, True),
    ],
)
def test_fast_backends_match_loop(impl, dtype, two_layer, act, bias, skipped):
    case = _case(two_layer, act, bias, skipped)
    ref_out, ref_grads = _run("loop", case, act, dtype, skipped)
    out, grads = _run(impl, case, act, dtype, skipped)
    assert out.dtype == ref_out.dtype
    assert_rel_close(out, ref_out, TOL[dtype], "forward")
    for k in ref_grads:
        assert_rel_close(grads[k], ref_grads[k], TOL[dtype], f"grad {k}")


def test_grouped_mm_pads_unaligned_dims():
    """d = 13 and f = 7 in fp32 are not 16-byte rows: grouped_mm pads and still matches."""
    case = _case(True, "swiglu", True, True, d=13, f=7)
    ref_out, ref_grads = _run("loop", case, "swiglu", torch.float32, True)
    out, grads = _run("grouped_mm", case, "swiglu", torch.float32, True)
    assert_rel_close(out, ref_out, 1e-5, "forward")
    for k in ref_grads:
        assert_rel_close(grads[k], ref_grads[k], 1e-5, f"grad {k}")


def test_skipped_assignments_contribute_nothing():
    x = torch.randn(4, 8)
    w1 = torch.randn(2, 8, 8)
    src = torch.tensor([0, 1, 2])
    expert = torch.tensor([2, 2, 2])  # all skipped (id == E)
    for impl in ("loop", "bmm", "sort", "grouped_mm"):
        out = expert_mixture(x, src, expert, torch.ones(3), w1, torch.ones(2, 8), impl=impl, skipped=True)
        assert torch.equal(out, torch.zeros(4, 8)), impl


def test_resolve_impl(monkeypatch):
    assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "sort"
    assert resolve_impl("loop", torch.device("cpu"), torch.float32) == "loop"
    with pytest.raises(ValueError, match="unknown dispatch 'fast'"):
        resolve_impl("fast", torch.device("cpu"), torch.float32)
    monkeypatch.setattr(dispatch, "grouped_mm_available", lambda device_type, dtype: False)
    with pytest.warns(UserWarning, match="_grouped_mm is unavailable"):
        assert resolve_impl("grouped_mm", torch.device("cpu"), torch.float32) == "sort"


def test_custom_op_registration():
    """Schema, fake (meta) implementation and autograd registration agree with the kernel."""
    t, src, expert, dst, n_out, _ = _case(True, "gelu", True, False)
    order = torch.argsort(expert, stable=True)
    es = expert[order]
    offs = torch.searchsorted(es, torch.arange(1, 6), out_int32=True)
    args = (
        t["x"].requires_grad_(), src[order], dst[order], es, t["gate"][order].requires_grad_(),
        offs, t["w1"].requires_grad_(), t["b1"].requires_grad_(), t["w2"].requires_grad_(),
        t["b2"].requires_grad_(), "gelu", n_out, "sort", False,
    )  # fmt: skip
    torch.library.opcheck(
        torch.ops.blockdsl.expert_ffn.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("two_layer", [True, False])
def test_sort_backward_passes_gradcheck(two_layer):
    """The hand-written backward of the custom op against finite differences (fp64)."""
    g = torch.Generator().manual_seed(0)
    f64 = {"dtype": torch.float64, "generator": g}
    x = torch.randn(6, 4, **f64).requires_grad_()
    w1 = torch.randn(3, 4, 10 if two_layer else 5, **f64).requires_grad_()
    b1 = torch.randn(3, w1.shape[-1], **f64).requires_grad_()
    w2 = torch.randn(3, 5, 4, **f64).requires_grad_() if two_layer else None
    gate = torch.rand(12, **f64).requires_grad_()
    src, expert = torch.randint(0, 6, (12,), generator=g), torch.randint(0, 4, (12,), generator=g)
    act = "swiglu" if two_layer else "none"

    def f(x, gate, w1, b1, *w2):
        return expert_mixture(
            x, src, expert, gate, w1, b1, *w2, activation=act, impl="sort", skipped=True
        )

    assert torch.autograd.gradcheck(f, (x, gate, w1, b1, *([w2] if two_layer else [])))


def test_row_bucketing_is_exact_and_only_where_onednn_compiles_shapes() -> None:
    from blockdsl.nn.dispatch import ROW_BUCKET, _mm_rows, _mm_sum, _row_bucket

    torch.manual_seed(0)
    assert _row_bucket(torch.zeros(1, dtype=torch.bfloat16)) == ROW_BUCKET
    assert _row_bucket(torch.zeros(1)) == 1
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert _row_bucket(torch.zeros(1)) == ROW_BUCKET
    finally:
        torch.set_float32_matmul_precision(prev)
    a, b, g = torch.randn(37, 8), torch.randn(8, 5), torch.randn(37, 5)
    torch.testing.assert_close(_mm_rows(a, b, 32), a @ b, atol=0, rtol=0)
    out = torch.empty(37, 5)
    assert _mm_rows(a, b, 32, out=out) is out
    torch.testing.assert_close(out, a @ b, atol=0, rtol=0)
    gw = torch.empty(8, 5)
    _mm_sum(a.t(), g, 32, out=gw)
    torch.testing.assert_close(gw, a.t() @ g, atol=1e-6, rtol=1e-6)
