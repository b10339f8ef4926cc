"""The name lists both the language and the modules spell: one place, no torch.

Why a module of its own: the registry (torch-free, so `blockdsl check` stays instant)
checks spec arguments against these lists, and `blockdsl/nn/` validates the same names
at construction. Written in both, the lists drifted (a new dispatch backend had to be
added to three tuples); imported from here, a name added once is accepted everywhere.
The run settings the CLI, training and the search all check (precisions, samplers,
start designs) live here for the same reason: the CLI's argument parser must offer them
without importing training (torch) or the search (Optuna).
"""

from __future__ import annotations

# Elementwise activations, then the gated (GLU) ones, each mapped to the elementwise
# function its gate half goes through (Shazeer 2020).
ELEMENTWISE: tuple[str, ...] = ("relu", "gelu", "gelu_tanh", "silu")
GATE_OF: dict[str, str] = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
GATED: tuple[str, ...] = tuple(GATE_OF)
ACTIVATIONS: tuple[str, ...] = (*ELEMENTWISE, *GATED)

# Expert dispatch backends (see nn/dispatch/); "auto" picks one per shape and device.
DISPATCH_BACKENDS: tuple[str, ...] = ("fused", "bmm", "grouped_mm", "sort", "loop")
DISPATCH: tuple[str, ...] = ("auto", *DISPATCH_BACKENDS)

# Attention kernels (see nn/attention.py); "auto" is resolved by lowering.
ATTENTION_IMPLS: tuple[str, ...] = ("sdpa", "bmm", "manual")
ATTENTION: tuple[str, ...] = ("auto", *ATTENTION_IMPLS)

# Norm kinds a layer may carry ("none" is a kind the language accepts for `norm none()`,
# not a module) and where a residual sub-layer places them.
NORM_KINDS: tuple[str, ...] = ("layernorm", "rmsnorm")
PLACEMENTS: tuple[str, ...] = ("pre", "post", "sandwich", "peri", "none")
# How many norms each placement puts around its sub-layer: the resolver attaches this
# many and `nn.model.Residual` demands it. "peri" is the exception both apply: its one
# norm feeds only the sub-layer's `x_norm=` input, so a primitive that reads none gets 0.
NORMS_PER_PLACEMENT: dict[str, int] = {"pre": 1, "post": 1, "sandwich": 2, "peri": 1, "none": 0}
assert tuple(NORMS_PER_PLACEMENT) == PLACEMENTS

# Numeric precisions a run (train, search, compile --tune) may use; see blockdsl/device.py.
PRECISIONS: tuple[str, ...] = ("fp32", "fp32-medium", "bf16")

# How `blockdsl train --shard` lays parameters over ranks: none (replicated) or FSDP2.
SHARDING: tuple[str, ...] = ("none", "fsdp")

# Search samplers ("auto": TPE for one objective, NSGA-II for several; built by
# search/samplers.py) and start designs (search/arch.py's neighbourhood, or Optuna's
# random start-up trials).
SAMPLERS: tuple[str, ...] = ("auto", "tpe", "nsga2", "random")
STARTS: tuple[str, ...] = ("neighbourhood", "random")

# Expert weight size (d_in x first-layer width) up to which dispatch "auto" takes "fused"
# (or "bmm") on CPU: the kernel rule (nn/dispatch.resolve_impl, where its evidence is) and
# the torch-free memory estimate must agree on it, so it is written here once.
SMALL_EXPERT_WEIGHT = 32768


def is_gated(act: str) -> bool:
    """Gated activations need an input projection twice as wide (gate and up halves)."""
    return act in GATE_OF
