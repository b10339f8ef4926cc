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
- "fused" (CPU): a C++ kernel (`fused.py`, `fused.cpp`) that takes each expert's rows
  through gather, both matmuls, activation, gate and scatter one L2-sized tile at a time,
  with the build's BLAS on raw pointers in fp32 and bf16: no [M, d] temporaries streamed
  through memory, no per-op overhead; the default for small experts on CPU.
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

One module per backend, so a new one is one file and one branch in `expert_mixture`:
`loop.py` (the reference), `sort.py` and `grouped.py` (bodies run inside the custom op of
`op.py`), `padded.py` ("bmm"), `fused.py` (with its `fused.cpp`); `common.py` holds
what they share. This file keeps the entry point and the choice between them
(`resolve_impl`).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from blockdsl.names import DISPATCH as IMPLS
from blockdsl.names import SMALL_EXPERT_WEIGHT
from blockdsl.nn.dispatch.grouped import _align_for_grouped_mm
from blockdsl.nn.dispatch import fused
from blockdsl.nn.dispatch.fused import fused_mixture
from blockdsl.nn.dispatch.loop import _loop
from blockdsl.nn.dispatch.op import _expert_ffn
from blockdsl.nn.dispatch.padded import _PaddedFFN, _slots


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


# Expert weight size (d_in x first-layer width) up to which "auto" takes "fused" (or "bmm")
# on CPU.
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
    """Map "auto" (and an unavailable "grouped_mm" or "fused") to a concrete backend.

    Rule. CPU: "fused" when an expert's weights are small (d_in * d_hidden <=
    SMALL_EXPERT_WEIGHT) and the kernel runs for the dtype with its BLAS (fp32 at
    "highest" matmul precision, bf16; `fused.fast_for`), else "bmm" for small experts;
    "grouped_mm" (if `_grouped_mm` runs, else "sort") for larger ones. CUDA: "grouped_mm"
    when it runs for the dtype (one kernel per matmul, no host sync; chosen, not measured
    here: no GPU), else "bmm". Without a shape the large-expert rule applies.

    Evidence, CPU, medians of interleaved rounds with their min-max (docs/bench/):
    - search scale (benchmarks/moe_search_scale.py; d = 48, 8 experts, top-2, 1024 tokens,
      1 thread; whole-model train step against the dense model of equal FLOPs): "fused"
      1.15-1.17x in fp32 and 1.21-1.30x in bf16, "bmm" 1.55-1.62x and 1.50-1.53x in the
      same runs ("sort" 2.07x and 3.02x in an earlier one). Per-op overhead and memory
      traffic rule here; "fused" keeps each expert's rows in L2 and has no per-op cost.
    - coarse 8x512 d256 and MoEUT-44M 155x128 d412, 4096 tokens, 2 threads
      (benchmarks/moe_layer.py), ms per fwd+bwd: fp32 coarse: bmm 122, grouped_mm 123,
      fused 146; MoEUT: grouped_mm 524, fused 560, bmm 1303. bf16 coarse: bmm 62,
      grouped_mm 68, fused 99; MoEUT: fused 477, grouped_mm 554, bmm 827. Where matmuls
      dominate, "grouped_mm" runs big multi-threaded matmuls and is exact; "fused" only
      wins MoEUT in bf16 there (and ties are within the 10-25% spreads), so large experts
      keep "grouped_mm".
    `blockdsl compile --tune` races every backend at the real shape and overrides this.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown dispatch {impl!r}; expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        grouped = grouped_mm_available(device.type, dtype)
        if device.type == "cuda":
            return "grouped_mm" if grouped else "bmm"
        if d_in is not None and d_hidden is not None and d_in * d_hidden <= SMALL_EXPERT_WEIGHT:
            return "fused" if fused.fast_for(dtype) else "bmm"
        return "grouped_mm" if grouped else "sort"
    if impl == "fused" and (device.type != "cpu" or not fused.supports(dtype)):
        if device.type != "cpu":
            warnings.warn(f"the fused MoE kernel runs on CPU only; using 'bmm' on {device.type}",
                          stacklevel=3)
        elif fused.available():  # (a failed build has already warned once)
            warnings.warn(f"this torch build has no BLAS the fused MoE kernel can call for "
                          f"{dtype}; using 'bmm'", stacklevel=3)
        return "bmm"
    if impl == "grouped_mm" and not grouped_mm_available(device.type, dtype):
        warnings.warn(
            f"torch._grouped_mm is unavailable for {dtype} on {device.type}; using 'sort'",
            stacklevel=3,
        )
        return "sort"
    return impl


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
    ep: Any = None,
) -> Tensor:
    """Σ_m gate_m · f_{e_m}(x[src_m]) scattered into rows dst_m of an [n_out, d_out] result.

    x [N, d_in]; src, expert, gate [M]; w1 [E, d_in, F], b1 [E, F]; w2 [E, f, d_out], b2
    [E, d_out]. f_e(v) = act(v W1_e + b1_e) W2_e + b2_e, or v W1_e + b1_e when w2 is None
    (SwitchHead's V/O projections). dst defaults to src, n_out to N. `skipped` must be
    True when some expert ids equal E (dropped assignments); the fast backends then mask
    rather than sync. `max_load`, when the routing guarantees it (a capacity), bounds the
    assignments any expert gets, so "bmm" can size its slots without a host sync. Under
    autocast the matmuls run in the autocast dtype; the scatter accumulates in fp32.
    Returns the compute dtype. `ep` (an `nn.expert_parallel.ExpertParallel`, or None):
    the weights are this rank's block of experts and the expert ids are global; the rows
    travel to their experts' ranks and back (see that module).
    """
    if ep is not None:
        return ep.mixture(x, src, expert, gate, w1, b1, w2, b2, activation=activation,
                          dst=dst, n_out=n_out, impl=impl, skipped=skipped, max_load=max_load)
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
    if backend == "fused":
        return fused_mixture(x, src, dst, expert, gate.to(gdt), w1, b1, w2, b2, activation,
                             n_out)
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
