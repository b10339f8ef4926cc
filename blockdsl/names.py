"""The name lists both the language and the modules spell: one place, no torch.

Why a module of its own: the registry (torch-free, so `blockdsl check` stays instant)
checks spec arguments against these lists, and `blockdsl/nn/` validates the same names
at construction. Written in both, the lists drifted (a new dispatch backend had to be
added to three tuples); imported from here, a name added once is accepted everywhere.
"""

from __future__ import annotations

# Elementwise activations, then the gated (GLU) ones, each mapped to the elementwise
# function its gate half goes through (Shazeer 2020).
ELEMENTWISE: tuple[str, ...] = ("relu", "gelu", "gelu_tanh", "silu")
GATE_OF: dict[str, str] = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
GATED: tuple[str, ...] = tuple(GATE_OF)
ACTIVATIONS: tuple[str, ...] = (*ELEMENTWISE, *GATED)

# Expert dispatch backends (see nn/dispatch.py); "auto" picks one per shape and device.
DISPATCH_BACKENDS: tuple[str, ...] = ("bmm", "grouped_mm", "sort", "loop")
DISPATCH: tuple[str, ...] = ("auto", *DISPATCH_BACKENDS)

# Attention kernels (see nn/attention.py); "auto" is resolved by lowering.
ATTENTION_IMPLS: tuple[str, ...] = ("sdpa", "bmm", "manual")
ATTENTION: tuple[str, ...] = ("auto", *ATTENTION_IMPLS)

# Norm kinds a layer may carry ("none" is a kind the language accepts for `norm none()`,
# not a module) and where a residual sub-layer places them.
NORM_KINDS: tuple[str, ...] = ("layernorm", "rmsnorm")
PLACEMENTS: tuple[str, ...] = ("pre", "post", "sandwich", "peri", "none")

# Expert weight size (d_in x first-layer width) up to which dispatch "auto" takes "bmm" on
# CPU: the kernel rule (nn/dispatch.resolve_impl, where its evidence is) and the torch-free
# memory estimate must agree on it, so it is written here once.
SMALL_EXPERT_WEIGHT = 32768


def is_gated(act: str) -> bool:
    """Gated activations need an input projection twice as wide (gate and up halves)."""
    return act in GATE_OF
