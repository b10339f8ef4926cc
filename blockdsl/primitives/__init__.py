"""The primitive registry: one entry per layer kind, everything about it in one place.

Torch-free, so `blockdsl check` and every summary stay instant. Each entry's formulas
mirror the exact parameter layout of the module its lowering builds; tests assert the
two agree for every shipped spec. FLOPs are forward FLOPs per token with a multiply-add
counted as 2 (attention's score term: see `attention.py`); norms, activations and
softmax are not counted.

Adding a primitive: a module (anywhere; the shipped ones live in `blockdsl/nn/`) and one
`register(Primitive(...))` with its schema, checks, formulas, family and `Lowering`
(plus a `Tunable` if it has implementations to measure, a `memory` formula for the
memory estimate, `x_norm=True` if it reads the peri-norm input). tests/test_extend.py does it
from a test file alone. The shipped entries live one module per family, imported below
so that importing the registry fills it.
"""

from __future__ import annotations

from blockdsl.names import ACTIVATIONS, DISPATCH, GATED, PLACEMENTS
from blockdsl.primitives.base import (
    FAMILIES,
    PRIMITIVES,
    REQUIRED,
    ArgError,
    ArgSpec,
    BuildEnv,
    Ctx,
    Family,
    Lowering,
    Primitive,
    Tunable,
    get,
    register,
    register_family,
    tunable,
    unregister,
)

# The shipped families, in the order the report's breakdown lists them.
register_family(Family("attn", "attention", "#8ecae6"))
register_family(Family("ffn", "dense FFN", "#ffb703"))
register_family(Family("moe", "routed FFN (MoE)", "#fb8500"))

# Importing the family modules registers their entries (order = the language's listing).
from blockdsl.primitives import attention, ffn, moe  # noqa: E402, F401
from blockdsl.primitives.attention import attention_impl  # noqa: E402
from blockdsl.primitives.stems import (  # noqa: E402
    ALTUP,
    HEADS,
    NORMS,
    STEMS,
    altup_flops,
    altup_params,
    head_flops,
    head_params,
    norm_params,
    stem_flops,
    stem_params,
    stem_tokens,
)

__all__ = [
    "ACTIVATIONS", "ALTUP", "DISPATCH", "FAMILIES", "GATED", "HEADS", "NORMS", "PLACEMENTS",
    "PRIMITIVES", "REQUIRED", "STEMS", "ArgError", "ArgSpec", "BuildEnv", "Ctx",
    "Family", "Lowering", "Primitive", "Tunable", "altup_flops", "altup_params",
    "attention_impl", "get", "head_flops", "head_params", "norm_params", "register",
    "register_family", "stem_flops", "stem_params", "stem_tokens", "tunable", "unregister",
]
