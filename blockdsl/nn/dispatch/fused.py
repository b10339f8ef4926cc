"""The "fused" backend: a C++ kernel (fused.cpp) that runs each expert's rows through gather,
both matmuls, the activation, the gate and the scatter one L2-sized tile at a time (CPU),
and the token-choice router's softmax and top-k in one pass.

Why C++ and not more tensor ops: at the search's scale the routed slot's extra time is
memory traffic and per-call costs, not arithmetic. Every whole-array pass of the "bmm"
backend ([M, d] gathers, gate products, scatters, the activation and its backward) streams
a fresh buffer through memory, and on this shared VM an op on cold memory runs 1.5-3x
slower than on warm (measured at the search shape, 1 thread: gelu_backward 94 vs 174 us, a
row-gated mul 15 vs 48 us, bmm 66 vs 105 us). A tile's gathered rows, hidden activations
and outputs stay in L2 here; only x, the saved h and act(h), and the results cross memory.

The matmuls are the torch build's BLAS on raw pointers (x86 builds link MKL and export
it): `sgemm` in fp32, MKL's bf16 x bf16 -> fp32 GEMM in bf16; every other loop is
hand-written and compiled for AVX-512/AVX2/x86-64 (picked at load). Activations use their
own exp and erf (erf as ATen's vectorised one, Abramowitz-Stegun 7.1.26), gradients and
accumulators are fp32, and in bf16 the matmul outputs stay fp32 between the two matmuls
(autocast would round them to bf16): within fp32 rounding of the other backends in fp32,
and at least as close to an fp32 reference in bf16 (tests/nn/test_dispatch.py). Where the
build exports no BLAS for the dtype (other CPUs' builds, fp16), `supports` is False and
blockdsl runs "bmm" instead.

The extension is compiled on first use with torch's own `cpp_extension.load` (about 30 s,
once per machine, torch version and kernel source, cached in torch's extensions folder;
`scripts/setup.sh` does it at install) and needs a C++ compiler and ninja (a dependency).
Where it cannot be built, `available()` is False, one warning says why, and "auto" keeps
"bmm"; asking for "fused" explicitly then runs "bmm". `BLOCKDSL_FUSED=off` turns it off.
Plain torch.autograd.Functions (not custom ops): nothing here is traced by `torch.compile`;
under tracing `nn.traceable` swaps in the traceable "sort" dispatch, which also turns the
fused router off.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blockdsl.names import GATE_OF

_SOURCE = Path(__file__).with_name("fused.cpp")
_ACT = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
_lock = threading.Lock()
_ext: Any = None
_failed: str | None = None

# Tile size: a tile's gathered input, hidden activations and output (d + 2F + d_out values
# per row) within ~256 KiB, so one tile stays in a core's L2 next to its expert's weights;
# at least 128 rows (smaller matmuls lose BLAS efficiency), at most 512.
TILE_BYTES = 256 * 1024


def extension() -> Any:
    """The compiled kernel module, building it on first use; None where it cannot be built."""
    global _ext, _failed
    if _ext is not None or _failed is not None:
        return _ext
    with _lock:
        if _ext is not None or _failed is not None:
            return _ext
        if os.environ.get("BLOCKDSL_FUSED", "").lower() in ("0", "off", "false", "no"):
            _failed = "BLOCKDSL_FUSED is off"
            return None
        try:
            from torch.utils.cpp_extension import load

            # torch runs `ninja` from PATH; the one pip installed sits beside this interpreter
            bindir = str(Path(sys.executable).parent)
            if bindir not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
            # the name carries the source's hash: an edited kernel never loads a stale build
            digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
            _ext = load(name=f"blockdsl_fused_{digest}", sources=[str(_SOURCE)],
                        extra_cflags=["-O3"], verbose=False)
        except Exception as e:  # compiler, ninja or headers missing: fall back, say so once
            last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            _failed = f"{type(e).__name__}: {last}"
            warnings.warn(f"blockdsl: the fused CPU MoE kernel could not be built ({_failed}); "
                          "using the 'bmm' dispatch", RuntimeWarning, stacklevel=2)
    return _ext


def available() -> bool:
    return extension() is not None


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernel runs for `dtype` here: built, with the BLAS it calls (fp32: sgemm,
    bf16: MKL's bf16 GEMM; both exported by x86 torch builds)."""
    if not available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    return bool(extension().has_blas(dtype == torch.bfloat16))


def fast_for(dtype: torch.dtype) -> bool:
    """Whether "auto" takes the kernel for `dtype`: `supports`, and for fp32 at "highest"
    matmul precision (under "medium", fp32-medium's bf16 matmuls, the kernel would compute
    in full fp32: exact, but not the speed that setting asks for)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return False
    return supports(dtype)


def tile_rows(d_in: int, width: int, d_out: int) -> int:
    """Rows per tile: as many as keep a tile's buffers within TILE_BYTES, 128 to 512."""
    per_row = (d_in + 2 * width + d_out) * 4
    return max(128, min(512, TILE_BYTES // max(per_row, 1)))


class _FusedFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, dst, expert, gate, w1, b1, w2, b2, activation, n_out):
        gated = activation in GATE_OF
        act = _ACT[GATE_OF.get(activation, activation)]
        d_out = (w1 if w2 is None else w2).shape[-1]
        tile = tile_rows(x.shape[1], w1.shape[-1], d_out)
        x, w1 = x.contiguous(), w1.contiguous()
        opt = [t if t is None else t.contiguous() for t in (b1, w2, b2)]
        out, h, a = extension().forward(x, src, dst, expert, gate, w1, *opt, act, gated, n_out,
                                        tile)
        # None stays out of save_for_backward: the flags say which of b1, w2, b2, a exist
        present = tuple(t is not None for t in (*opt, a))
        ctx.save_for_backward(x, src, dst, expert, gate, w1, h,
                              *[t for t in (*opt, a) if t is not None])
        ctx.static = (act, gated, tile, present)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, go):
        x, src, dst, expert, gate, w1, h, *rest = ctx.saved_tensors
        act, gated, tile, present = ctx.static
        it = iter(rest)
        b1, w2, b2, a = (next(it) if p else None for p in present)
        need = ctx.needs_input_grad
        gx, ggate, gw1, gb1, gw2, gb2 = extension().backward(
            go, x, src, dst, expert, gate, w1, b1, w2, b2, h, h if a is None else a, act,
            gated, tile, bool(need[0]), bool(need[5] or need[6] or need[7] or need[8]),
        )  # (a is only read for an ungated two-layer expert, which always saves it)

        def cast(t: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if t is None or like is None else (
                t if t.dtype == like.dtype else t.to(like.dtype))

        return (cast(gx, x), None, None, None, cast(ggate, gate), cast(gw1, w1), cast(gb1, b1),
                cast(gw2, w2), cast(gb2, b2), None, None)


def fused_mixture(x: Tensor, src: Tensor, dst: Tensor, expert: Tensor, gate: Tensor,
                  w1: Tensor, b1: Tensor | None, w2: Tensor | None, b2: Tensor | None,
                  activation: str, n_out: int) -> Tensor:
    """`expert_mixture`'s contract on the fused kernel (gate fp32, ids int64, skip id E)."""
    return _FusedFFN.apply(x, src.long().contiguous(), dst.long().contiguous(),
                           expert.long().contiguous(), gate.float().contiguous(), w1, b1, w2,
                           b2, activation, n_out)


class _TopKRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, k, renormalize):
        probs, gate, expert, token, counts, mean = extension().topk_route_forward(
            logits, k, renormalize)
        ctx.save_for_backward(probs, expert, gate)
        ctx.static = (k, renormalize)
        ctx.mark_non_differentiable(expert, token, counts)
        return gate, expert, token, counts, mean

    @staticmethod
    def backward(ctx, dgate, _dexpert, _dtoken, _dcounts, dmean):
        probs, expert, gate = ctx.saved_tensors
        k, renormalize = ctx.static
        return extension().topk_route_backward(probs, expert, gate, dgate, dmean, k,
                                               renormalize), None, None


def topk_route(logits: Tensor, k: int, renormalize: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Softmax over the experts of fp32 [N, E] logits and each token's top k, in one pass:
    (gate, expert, token) rank-major [k N] (assignment r N + n is token n's r-th choice,
    gate = its probability, renormalised over the k when asked), the per-expert choice
    counts [E] and the mean probabilities [E] (the Switch balance loss's f and P).
    Differentiable in gate and mean; ties go to the lower expert id."""
    return _TopKRoute.apply(logits, k, renormalize)


def routes_here(logits: Tensor) -> bool:
    """Whether `topk_route` can run: CPU fp32 logits, the kernel built, not being traced."""
    return (logits.device.type == "cpu" and logits.dtype == torch.float32
            and not torch.compiler.is_compiling() and available())
