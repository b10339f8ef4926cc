"""The fast dispatch backends against the per-expert loop reference.

Tolerances (max |fast - loop| relative to max |loop|, forward and every gradient):
fp32 1e-5; bf16 autocast 3e-2 (the backends round bf16 intermediates at different points).
"""

from __future__ import annotations

import pytest
import torch

from blockdsl.nn import dispatch
from blockdsl.nn.dispatch import expert_mixture, padded, resolve_impl

FAST = ("fused", "bmm", "sort", "grouped_mm")
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
    """bf16 references: the loop under autocast for the backends that, like autocast, round
    every matmul output to bf16; for "fused", which keeps MKL's fp32 matmul outputs between
    its bf16 matmuls, the loop in fp32 on inputs rounded to bf16. (ReLU's kink makes the
    gradients depend on where h is rounded: near h = 0 a rounding flips whole gradient rows,
    and the two conventions end 5% apart in grad x on the relu case, while each backend is
    within 0.3-0.7% of its own reference on a 300-token case.)"""
    case = _case(two_layer, act, bias, skipped)
    if dtype == torch.bfloat16 and impl == "fused":
        t, *rest = case
        rounded = ({k: v.bfloat16().float() for k, v in t.items()}, *rest)
        ref_out, ref_grads = _run("loop", rounded, act, torch.float32, skipped)
        ref_out = ref_out.to(dtype)
    else:
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
    for impl in ("loop", "fused", "bmm", "sort", "grouped_mm"):
        out = expert_mixture(x, src, expert, torch.ones(3), w1, torch.ones(2, 8), impl=impl, skipped=True)
        assert torch.equal(out, torch.zeros(4, 8)), impl


def test_resolve_impl(monkeypatch):
    cpu = torch.device("cpu")
    grouped = "grouped_mm" if dispatch.grouped_mm_available("cpu", torch.float32) else "sort"
    # the search's MoE slots (d <= 64, d_moe <= 4d, gated) -> fused;
    # MoEUT-44M, coarse -> grouped
    assert resolve_impl("auto", cpu, torch.float32, 48, 48) == "fused"
    assert resolve_impl("auto", cpu, torch.bfloat16, 64, 2 * 256) == "fused"
    assert resolve_impl("auto", cpu, torch.float32, 412, 128) == grouped
    assert resolve_impl("auto", cpu, torch.bfloat16, 256, 2 * 512) == grouped
    assert resolve_impl("auto", cpu, torch.float32) == grouped  # no shape: large rule
    assert resolve_impl("bmm", cpu, torch.float32) == "bmm"
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
    from blockdsl.nn.dispatch.common import ROW_BUCKET, _mm_rows, _mm_sum, _row_bucket

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


# ------------------------------------------------------------------ "bmm" (padded) backend
def _layout(expert: torch.Tensor, n_exp: int, dtype=torch.float32, max_load=None):
    inv, tile_expert = padded._slots(expert, n_exp, torch.zeros(1, dtype=dtype), max_load)
    tiles = n_exp if tile_expert is None else tile_expert.numel()
    owner = torch.arange(n_exp) if tile_expert is None else tile_expert
    return inv, owner, tiles


@pytest.mark.parametrize(
    "expert,n_exp",
    [
        (torch.tensor([0, 1, 2, 3] * 6), 4),  # balanced: one tile per expert
        (torch.zeros(40, dtype=torch.long), 4),  # everything on expert 0: tiled
        (torch.tensor([3] * 30 + [1] * 2), 5),  # empty experts 0, 2, 4
        (torch.tensor([0, 2, 2, 1, 2, 0, 2]), 2),  # id 2 == E: skipped
        (torch.tensor([2, 2, 2]), 2),  # all skipped
        (torch.zeros(0, dtype=torch.long), 3),  # no assignments at all
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bmm_slots_hold_every_kept_assignment_once_in_its_experts_tile(expert, n_exp, dtype):
    m = expert.numel()
    inv, owner, tiles = _layout(expert, n_exp, dtype)
    assert inv.numel() % max(tiles, 1) == 0
    t = inv.numel() // tiles if tiles else 0
    kept = (expert < n_exp).nonzero().squeeze(1)
    filled = inv[inv < m]
    assert sorted(filled.tolist()) == kept.tolist()  # each kept assignment exactly once
    for k in range(tiles):
        rows = inv[k * t : (k + 1) * t]
        rows = rows[rows < m]
        assert (expert[rows] == owner[k]).all()
    loads = torch.bincount(expert, minlength=n_exp + 1)[:n_exp]
    # padding stays bounded: under 1.25 x M plus one bucket of rounding per tile
    bucket = 8 if dtype == torch.float32 else 16
    assert inv.numel() <= max(1.25 * m, int(loads.max().item() if m else 0) * n_exp) + bucket * tiles


def test_bmm_uses_a_capacity_bound_only_where_it_is_exact():
    expert = torch.arange(4).repeat_interleave(6)  # every expert exactly 6 (expert choice)
    inv, _, tiles = _layout(expert, 4, max_load=6)
    assert tiles == 4 and inv.numel() == 4 * 8  # 6 rounded up to the fp32 bucket of 8
    light = torch.tensor([0, 1, 2, 3])  # a capacity of 6 but loads of 1: CPU reads the loads
    inv, _, tiles = _layout(light, 4, max_load=6)
    assert inv.numel() == 4 * 8 and (inv < 4).sum() == 4


def test_capacity_bucket_edges():
    b = padded._capacity_bucket
    f32, bf16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    assert [b(c, f32) for c in (0, 1, 8, 9, 16, 17)] == [0, 8, 8, 16, 16, 24]
    # oneDNN shapes: 1/16 of the power of two, at least 16
    assert [b(c, bf16) for c in (1, 16, 17, 255, 256, 257, 1000)] == [16, 16, 32, 256, 256, 272, 1024]
    for c in range(1, 3000, 7):
        assert c <= b(c, bf16) <= max(c + 15, c * 1.0625)


@pytest.mark.parametrize("experts,skew", [(4, "one"), (5, "empty"), (3, "balanced")])
def test_bmm_matches_loop_on_skewed_routing(experts, skew):
    """All rows on one expert (tiled), empty experts, balanced (one tile each)."""
    g = torch.Generator().manual_seed(3)
    n, d, f = 40, 8, 6
    m = 2 * n
    if skew == "one":
        expert = torch.zeros(m, dtype=torch.long)
    elif skew == "empty":
        expert = torch.where(torch.rand(m, generator=g) < 0.9, 1, 3)
    else:
        expert = torch.arange(m) % experts
    src = torch.arange(n).repeat(2)
    t = {"x": torch.randn(n, d, generator=g), "gate": torch.rand(m, generator=g),
         "w1": torch.randn(experts, d, 2 * f, generator=g), "b1": torch.randn(experts, 2 * f, generator=g),
         "w2": torch.randn(experts, f, d, generator=g), "b2": torch.randn(experts, d, generator=g)}
    grad = torch.randn(n, d, generator=g)
    results = []
    for impl in ("loop", "bmm"):
        leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
        out = expert_mixture(leaves["x"], src, expert, leaves["gate"], leaves["w1"], leaves["b1"],
                             leaves["w2"], leaves["b2"], activation="swiglu", impl=impl)
        (out * grad).sum().backward()
        results.append((out.detach(), {k: v.grad for k, v in leaves.items()}))
    (ref, ref_g), (out, out_g) = results
    assert_rel_close(out, ref, 1e-5, "forward")
    for k in ref_g:
        assert_rel_close(out_g[k], ref_g[k], 1e-5, f"grad {k}")


def test_bmm_with_no_assignments_returns_zeros_and_zero_grads():
    x = torch.randn(3, 4, requires_grad=True)
    w1 = torch.randn(2, 4, 5, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    out = expert_mixture(x, empty, empty, torch.zeros(0), w1, impl="bmm")
    assert torch.equal(out, torch.zeros(3, 5))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 4)) and torch.equal(w1.grad, torch.zeros(2, 4, 5))


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("act", ["swiglu", "gelu", "none"])
def test_bmm_passes_gradcheck(act, skew):
    """float64 finite differences through the slot layout (the hand-written backward), one
    tile per expert and tiled, gated and plain activations, both biases, dst != src."""
    two_layer = act != "none"
    g = torch.Generator().manual_seed(0)
    f64 = {"dtype": torch.float64, "generator": g}
    x = torch.randn(6, 4, **f64).requires_grad_()
    w1 = torch.randn(3, 4, 10 if act == "swiglu" else 5, **f64).requires_grad_()
    b1 = torch.randn(3, w1.shape[-1], **f64).requires_grad_()
    w2 = torch.randn(3, 5, 4, **f64).requires_grad_() if two_layer else None
    b2 = torch.randn(3, 4, **f64).requires_grad_() if two_layer else None
    gate = torch.rand(12, **f64).requires_grad_()
    src = torch.randint(0, 6, (12,), generator=g)
    dst = torch.randint(0, 5, (12,), generator=g)
    expert = torch.tensor([0] * 10 + [1, 3]) if skew else torch.randint(0, 4, (12,), generator=g)

    def f(x, gate, w1, b1, *w2b2):
        return expert_mixture(x, src, expert, gate, w1, b1, *w2b2, activation=act, impl="bmm",
                              dst=dst, n_out=5, skipped=True)

    assert torch.autograd.gradcheck(f, (x, gate, w1, b1, *([w2, b2] if two_layer else [])))


def test_fused_kernel_builds_and_has_its_blas_here(monkeypatch):
    """The CPU kernel compiles on this machine and finds its BLAS for fp32 and bf16 (a failed
    build would silently fall back to "bmm" everywhere); fp16 has none: "bmm", with a warning
    when asked for by name. Under fp32-medium "auto" keeps "bmm" (bf16 matmuls asked for)."""
    from blockdsl.nn.dispatch import fused

    assert fused.available(), fused._failed
    assert fused.supports(torch.float32) and fused.supports(torch.bfloat16)
    assert not fused.supports(torch.float16)
    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="no BLAS the fused MoE kernel can call"):
        assert resolve_impl("fused", cpu, torch.float16) == "bmm"
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "medium")
    assert resolve_impl("auto", cpu, torch.float32, 48, 48) == "bmm"
    assert resolve_impl("fused", cpu, torch.float32, 48, 48) == "fused"


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu", "swiglu"])
def test_fused_fp32_activations_match_aten_at_scale(act):
    """The fast path's own exp/erf/tanh against ATen's kernels, over a wide range of
    pre-activations (|h| up to ~30, where exp underflows), through both tiles and biases."""
    g = torch.Generator().manual_seed(1)
    n, d, f, e, k = 700, 24, 40, 3, 2
    width = 2 * f if act == "swiglu" else f
    x = (torch.randn(n, d, generator=g) * 6).requires_grad_()
    w1 = (torch.randn(e, d, width, generator=g)).requires_grad_()
    b1 = torch.randn(e, width, generator=g).requires_grad_()
    w2 = (torch.randn(e, f, d, generator=g) / f**0.5).requires_grad_()
    src = torch.arange(n).repeat(k)
    expert = torch.randint(0, e, (n * k,), generator=g)
    gate = torch.rand(n * k, generator=g).requires_grad_()
    grad = torch.randn(n, d, generator=g)
    res = {}
    for impl in ("loop", "fused"):
        for t in (x, w1, b1, w2, gate):
            t.grad = None
        out = expert_mixture(x, src, expert, gate, w1, b1, w2, activation=act, impl=impl)
        (out * grad).sum().backward()
        res[impl] = [out.detach()] + [t.grad.clone() for t in (x, w1, b1, w2, gate)]
    for name, a, b in zip(("out", "x", "w1", "b1", "w2", "gate"), res["loop"], res["fused"]):
        assert_rel_close(b, a, 2e-5, f"{act} {name}")


def test_fused_tiles_split_heavy_experts():
    """An expert with more rows than a tile holds runs as several tiles (weight gradients
    summed over them) and still matches the loop."""
    from blockdsl.nn.dispatch import fused

    d = f = 8
    rows = fused.tile_rows(d, f, d)
    n = 2 * rows + 37
    g = torch.Generator().manual_seed(2)
    t = {"x": torch.randn(n, d, generator=g), "gate": torch.rand(n, generator=g),
         "w1": torch.randn(2, d, f, generator=g), "w2": torch.randn(2, f, d, generator=g)}
    src = torch.arange(n)
    expert = torch.zeros(n, dtype=torch.long)
    expert[-5:] = 1
    case = (t, src, expert, src, n, torch.randn(n, d, generator=g))
    ref_out, ref_grads = _run("loop", case, "gelu", torch.float32, False)
    out, grads = _run("fused", case, "gelu", torch.float32, False)
    assert_rel_close(out, ref_out, 1e-5, "forward")
    for k in ref_grads:
        assert_rel_close(grads[k], ref_grads[k], 1e-5, f"grad {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_runs_experts_in_parallel_and_still_matches(dtype):
    """With 2 threads the kernel spreads experts over threads, each scattering into its own
    accumulator: outputs and every gradient equal the 1-thread run's up to summation order."""
    g = torch.Generator().manual_seed(5)
    n, d, f, e, k = 300, 16, 24, 6, 2
    leaves = [torch.randn(n, d, generator=g), torch.randn(e, d, f, generator=g) / 4,
              torch.randn(e, f, generator=g), torch.randn(e, f, d, generator=g) / 5,
              torch.randn(e, d, generator=g)]
    src = torch.arange(n).repeat(k)
    expert = torch.randint(0, e, (n * k,), generator=g)
    gate = torch.rand(n * k, generator=g)
    grad = torch.randn(n, d, generator=g)
    runs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            ts = [v.clone().to(dtype).requires_grad_() for v in leaves]
            gt = gate.clone().requires_grad_()
            out = expert_mixture(ts[0], src, expert, gt, ts[1], ts[2], ts[3], ts[4],
                                 activation="gelu", impl="fused")
            (out.float() * grad).sum().backward()
            runs.append([out.detach()] + [v.grad for v in ts] + [gt.grad])
    finally:
        torch.set_num_threads(threads)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(*runs):
        assert_rel_close(b, a, tol)


def test_fused_refuses_rows_out_of_range():
    """The kernel reads x[src] and writes out[dst] through raw pointers: indices outside
    them are a clear error, never a read or write past a buffer."""
    x, w1 = torch.randn(4, 8), torch.randn(2, 8, 8)
    ok = torch.tensor([0, 1, 3])
    with pytest.raises(RuntimeError, match="src row 4 out of range"):
        expert_mixture(x, torch.tensor([0, 4, 1]), torch.tensor([0, 1, 1]), torch.ones(3), w1,
                       impl="fused")
    with pytest.raises(RuntimeError, match="dst row 5 out of range"):
        expert_mixture(x, ok, torch.tensor([0, 1, 1]), torch.ones(3), w1, impl="fused",
                       dst=torch.tensor([0, 5, 1]), n_out=5)
