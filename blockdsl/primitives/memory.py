"""What a layer keeps for backward: the pieces each registry entry's memory formula uses.

Torch-free, like every formula in the registry: `graph.estimate_memory` decides from the
Plan alone whether a run fits before anything is built. Each entry's `memory(m, args)`
returns (bytes saved for backward per application, beyond its norms and its bf16 weight
copy; bytes held only while the layer runs). Sizes use N = batch x seq tokens and e = 2
bytes under bf16 autocast else 4, fp32 (4 bytes) where the code computes in fp32.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from blockdsl.names import SMALL_EXPERT_WEIGHT, is_gated


class MemCtx(NamedTuple):
    """The step a memory formula sizes: width, batch, sequence, bytes per activation."""

    d: int
    batch: int
    seq: int
    e: int
    device_type: str
    precision: str

    @property
    def n(self) -> int:
        return self.batch * self.seq


def ffn_hidden(act: str, f: int) -> int:
    """Widths an FFN keeps for backward: the pre-activation(s) and the activation's output,
    and for a gated unit also the product that feeds the output projection."""
    return (4 if is_gated(act) else 2) * f


def dispatch_saves_rows(dispatch: str, expert_weight: int, device_type: str,
                        precision: str = "fp32") -> bool:
    """Whether the expert dispatch keeps per-slot tensors for backward ("bmm", "loop")
    rather than only the hidden ("fused", "sort", "grouped_mm"). "auto" is counted as what
    `resolve_impl` picks where the fused kernel builds with its BLAS (x86 torch builds): on
    CPU below SMALL_EXPERT_WEIGHT "fused" in fp32 and bf16, "bmm" under fp32-medium (bf16
    matmuls on fp32 tensors); above it and on GPUs "grouped_mm"/"sort"."""
    if dispatch == "auto":
        return (device_type == "cpu" and expert_weight <= SMALL_EXPERT_WEIGHT
                and precision == "fp32-medium")
    return dispatch in ("bmm", "loop")


def grid_slots(m: int, experts: int, a: dict[str, Any]) -> int:
    """Slots "bmm" lays m assignments out in: one [E, C] grid while padding stays under
    1.25x, else tiles of half the mean load (bucketed to >= 8 rows): at most ~1.5 m plus
    one bucket per expert; "loop" keeps exactly m rows."""
    return m if a.get("dispatch") == "loop" else math.ceil(1.6 * m) + 16 * experts


def grid_tiles(m: int, experts: int, a: dict[str, Any], e: int) -> int:
    """Tiles of a tiled "bmm" grid, each keeping its own copy of its expert's weights: tiles
    of t >= max(q, m / 2E) rows (q = 16 under bf16, else 8: `_capacity_bucket`) give
    sum_e ceil(load_e / t) <= E + min(2E, m / q)."""
    q = 16 if e == 2 else 8
    return 0 if a.get("dispatch") == "loop" else experts + min(2 * experts, -(-m // q))


def input_only(m: MemCtx, a: dict[str, Any]) -> tuple[int, int]:
    """The least any layer with weights keeps: its input, for the weight gradient. What an
    entry registered without a memory formula is counted at."""
    return m.n * m.d * m.e, 0
