"""The dense feed-forward primitive (`mlp`): w_out(act(w_in x)), gated kinds fused."""

from __future__ import annotations

from typing import Any

from blockdsl.names import ACTIVATIONS
from blockdsl.primitives.base import ArgSpec, Ctx, Lowering, Primitive, register
from blockdsl.primitives.common import d4, mlp_flops, mlp_params, positive, prob
from blockdsl.primitives.memory import MemCtx, ffn_hidden

ACT_ARG = ArgSpec("enum", "gelu", ACTIVATIONS, "activation (gated: swiglu, geglu, reglu)")


def _mlp_check(ctx: Ctx, a: dict[str, Any]) -> None:
    positive(a, "d_ff")
    prob(a, "dropout")


def _mlp_p(ctx: Ctx, a: dict[str, Any]) -> int:
    return mlp_params(ctx.d, a["d_ff"], a["act"], a["bias"])


def _mlp_memory(m: MemCtx, a: dict[str, Any]) -> tuple[int, int]:
    """Input N·d·e and hidden N·(g+1)·f·e (g = 2 for gated activations)."""
    return m.n * (m.d + ffn_hidden(a["act"], a["d_ff"])) * m.e, 0


MLP = register(Primitive(
    "mlp",
    "ffn",
    {
        "d_ff": ArgSpec("int", d4),
        "act": ACT_ARG,
        "bias": ArgSpec("bool", True),
        "dropout": ArgSpec("float", 0.0),
    },
    _mlp_check,
    _mlp_p,
    lambda ctx, a: float(_mlp_p(ctx, a)),
    lambda ctx, a: mlp_flops(ctx.d, a["d_ff"], a["act"]),
    "dense feed-forward",
    lowering=Lowering("blockdsl.nn.ffn:FeedForward",
                      {"d_ff": "d_ff", "act": "activation", "bias": "bias", "dropout": "dropout"}),
    memory=_mlp_memory,
    codegen="blockdsl.export.codegen.ffn:mlp",
))
