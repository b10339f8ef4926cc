"""Routed FFN primitives: token-choice top-k, expert choice, MoEUT's sigma-MoE.

Active parameters count the experts one token uses (k, or the capacity factor on
average for expert choice) plus the router; FLOPs likewise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from blockdsl.names import ELEMENTWISE
from blockdsl.primitives.base import REQUIRED, ArgError, ArgSpec, BuildEnv, Ctx, Lowering, Primitive, register
from blockdsl.primitives.common import (
    d4,
    gated_factor,
    k_le_experts,
    mlp_flops,
    mlp_params,
    nonneg,
    positive,
    prob,
)
from blockdsl.primitives.ffn import ACT_ARG
from blockdsl.primitives.memory import MemCtx, dispatch_saves_rows, ffn_hidden, grid_slots, grid_tiles
from blockdsl.primitives.routing import DISPATCH_ARG, dispatch_tunable


def _ffn_dims(a: dict[str, Any], d: int) -> tuple[int, int]:
    """(d_in, first-layer width) of an FFN expert's matmuls, which dispatch=auto decides on."""
    return d, a["d_ff"] * gated_factor(a["act"])


def _sigma_dims(a: dict[str, Any], d: int) -> tuple[int, int]:
    """(d_in, first-layer width) of a sigma-MoE expert (its activations are never gated)."""
    return d, a["expert_size"]


def _routed_memory(dims: Callable[[dict[str, Any], int], tuple[int, int]],
                   copies: Callable[[dict[str, Any]], float],
                   hidden: Callable[[dict[str, Any]], int]) -> Callable[..., tuple[int, int]]:
    """The memory formula of a routed FFN whose experts have `dims(args, d)`, each token
    being dispatched `copies(args)` times (k; the capacity factor for expert choice) and
    each copy keeping `hidden(args)` widths for backward.

    Kept: fp32 router logits and probabilities N·E·8 and, per copy, its hidden ("sort",
    "grouped_mm") or its input, hidden and output in every slot of the padded grid, plus
    the grid's per-tile weight copies ("bmm", "loop"). While it runs: the gathered inputs
    and per-assignment outputs.
    """

    def memory(m: MemCtx, a: dict[str, Any]) -> tuple[int, int]:
        n, d, e = m.n, m.d, m.e
        assignments = int(math.ceil(n * copies(a)))
        acts = n * d * e + n * a["experts"] * 8
        gate_width = dims(a, d)[1]
        if dispatch_saves_rows(a.get("dispatch", "auto"), d * gate_width, m.device_type,
                               m.precision):
            acts += grid_slots(assignments, a["experts"], a) * (2 * d + hidden(a)) * e
            acts += grid_tiles(assignments, a["experts"], a, e) * d * gate_width * 2 * e
        else:
            acts += assignments * hidden(a) * e
        if a.get("shared_d_ff"):
            acts += n * ffn_hidden(a["act"], a["shared_d_ff"]) * e
        return acts, assignments * 2 * d * e

    return memory


def _ffn_hidden(a: dict[str, Any]) -> int:
    return ffn_hidden(a["act"], a["d_ff"])


# ---------------------------------------------------------------- top-k
def _topk_check(ctx: Ctx, a: dict[str, Any]) -> None:
    positive(a, "experts", "k", "d_ff")
    k_le_experts(a)
    cf = a["capacity_factor"]
    if cf is not None and cf <= 0:
        raise ArgError(
            f"capacity_factor={cf} must be positive",
            "capacity_factor",
            "use capacity_factor=none for dropless routing",
        )
    nonneg(a, "router_noise", "balance_loss", "z_loss", "shared_d_ff")
    prob(a, "expert_dropout")


def _experts_params(ctx: Ctx, a: dict[str, Any]) -> int:
    return a["experts"] * mlp_params(ctx.d, a["d_ff"], a["act"], a["bias"])


def _shared_params(ctx: Ctx, a: dict[str, Any]) -> int:
    s = a.get("shared_d_ff", 0)
    return mlp_params(ctx.d, s, a["act"], a["bias"]) if s else 0


def _topk_params(ctx: Ctx, a: dict[str, Any]) -> int:
    return ctx.d * a["experts"] + _experts_params(ctx, a) + _shared_params(ctx, a)


def _topk_active(ctx: Ctx, a: dict[str, Any]) -> float:
    one = mlp_params(ctx.d, a["d_ff"], a["act"], a["bias"])
    return ctx.d * a["experts"] + a["k"] * one + _shared_params(ctx, a)


def _topk_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    s = a.get("shared_d_ff", 0)
    shared = mlp_flops(ctx.d, s, a["act"]) if s else 0.0
    return 2.0 * ctx.d * a["experts"] + a["k"] * mlp_flops(ctx.d, a["d_ff"], a["act"]) + shared


TOPK = register(Primitive(
    "topk",
    "moe",
    {
        "experts": ArgSpec("int", REQUIRED),
        "k": ArgSpec("int", 2),
        "d_ff": ArgSpec("int", d4),
        "act": ACT_ARG,
        "bias": ArgSpec("bool", True),
        "capacity_factor": ArgSpec("optfloat", None, doc="none: dropless"),
        "renormalize": ArgSpec("bool", False),
        "router_noise": ArgSpec("float", 0.0),
        "balance_loss": ArgSpec("float", 0.01),
        "z_loss": ArgSpec("float", 0.0),
        "shared_d_ff": ArgSpec("int", 0),
        "expert_dropout": ArgSpec("float", 0.0),
        "dispatch": DISPATCH_ARG,
    },
    _topk_check,
    _topk_params,
    _topk_active,
    _topk_flops,
    "token-choice top-k MoE (Switch/GShard)",
    lowering=Lowering(
        "blockdsl.nn.moe:TopKMoE",
        {"experts": "experts", "k": "k", "d_ff": "d_ff", "act": "activation", "bias": "bias",
         "capacity_factor": "capacity_factor", "renormalize": "renormalize",
         "router_noise": "router_noise", "balance_loss": "balance_weight",
         "z_loss": "z_weight", "shared_d_ff": "shared_d_ff",
         "expert_dropout": "expert_dropout", "dispatch": "dispatch"},
    ),
    tunable=dispatch_tunable(_ffn_dims),
    x_norm=True,
    memory=_routed_memory(_ffn_dims, lambda a: a["k"], _ffn_hidden),
    codegen="blockdsl.export.codegen.moe:topk",
))


# ---------------------------------------------------------------- expert choice
def _ec_check(ctx: Ctx, a: dict[str, Any]) -> None:
    positive(a, "experts", "d_ff", "capacity_factor")
    group = a["group"]
    if ctx.causal and group in ("batch", "auto"):
        raise ArgError(
            "expert-choice routing in a causal model must say how it avoids leaking the future"
            if group == "auto"
            else "group=batch lets experts pick tokens by comparing them with later tokens "
            "of the same sequence: that leaks the future in a causal model",
            "group",
            "use group=position (each expert picks among the tokens at one position across "
            "the batch, so no sequence sees its own future), or make the model non-causal",
        )


def _ec_active(ctx: Ctx, a: dict[str, Any]) -> float:
    # Each expert takes C = tokens*cf/E tokens, so a token meets cf experts on average.
    one = mlp_params(ctx.d, a["d_ff"], a["act"], a["bias"])
    return ctx.d * a["experts"] + min(a["capacity_factor"], a["experts"]) * one


def _ec_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    cf = min(a["capacity_factor"], a["experts"])
    return 2.0 * ctx.d * a["experts"] + cf * mlp_flops(ctx.d, a["d_ff"], a["act"])


def _ec_prepare(a: dict[str, Any], env: BuildEnv) -> dict[str, Any]:
    # `auto` passed the check only in a non-causal model, where one group per batch is right.
    if a["group"] == "auto":
        a["group"] = "batch"
    return a


EXPERT_CHOICE = register(Primitive(
    "expert_choice",
    "moe",
    {
        "experts": ArgSpec("int", REQUIRED),
        "capacity_factor": ArgSpec("float", 2.0),
        "d_ff": ArgSpec("int", d4),
        "act": ACT_ARG,
        "bias": ArgSpec("bool", True),
        "group": ArgSpec("enum", "auto", ("auto", "batch", "position")),
        "dispatch": DISPATCH_ARG,
    },
    _ec_check,
    _topk_params,
    _ec_active,
    _ec_flops,
    "expert-choice MoE (Zhou et al. 2022)",
    lowering=Lowering(
        "blockdsl.nn.moe:ExpertChoiceMoE",
        {"experts": "experts", "capacity_factor": "capacity_factor", "d_ff": "d_ff",
         "act": "activation", "bias": "bias", "group": "group", "dispatch": "dispatch"},
        prepare=_ec_prepare,
    ),
    tunable=dispatch_tunable(_ffn_dims),
    x_norm=True,
    memory=_routed_memory(_ffn_dims, lambda a: min(a["capacity_factor"], a["experts"]),
                          _ffn_hidden),
    codegen="blockdsl.export.codegen.moe:expert_choice",
))


# ---------------------------------------------------------------- sigma-MoE
def _sigma_check(ctx: Ctx, a: dict[str, Any]) -> None:
    positive(a, "experts", "k", "expert_size")
    k_le_experts(a)
    nonneg(a, "entropy")
    prob(a, "expert_dropout")


def _sigma_params(ctx: Ctx, a: dict[str, Any]) -> int:
    return a["experts"] * (2 * ctx.d * a["expert_size"] + ctx.d)


def _sigma_active(ctx: Ctx, a: dict[str, Any]) -> float:
    return a["experts"] * ctx.d + a["k"] * 2 * ctx.d * a["expert_size"]


def _sigma_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    return 2.0 * ctx.d * a["experts"] + a["k"] * 4.0 * ctx.d * a["expert_size"]


SIGMA_MOE = register(Primitive(
    "sigma_moe",
    "moe",
    {
        "experts": ArgSpec("int", REQUIRED),
        "k": ArgSpec("int", REQUIRED),
        "expert_size": ArgSpec("int", 128),
        "act": ArgSpec("enum", "relu", ELEMENTWISE),
        "entropy": ArgSpec("float", 0.01),
        "expert_dropout": ArgSpec("float", 0.0),
        "dispatch": DISPATCH_ARG,
    },
    _sigma_check,
    _sigma_params,
    _sigma_active,
    _sigma_flops,
    "sigma-MoE FFN (MoEUT)",
    lowering=Lowering(
        "blockdsl.nn.moe:SigmaMoE",
        {"experts": "experts", "k": "k", "expert_size": "expert_size", "act": "activation",
         "entropy": "entropy_weight", "expert_dropout": "expert_dropout",
         "dispatch": "dispatch"},
        env={"d": "d", "n_applications": "n_applications"},
    ),
    tunable=dispatch_tunable(_sigma_dims),
    x_norm=True,
    memory=_routed_memory(_sigma_dims, lambda a: a["k"], lambda a: 2 * a["expert_size"]),
    codegen="blockdsl.export.codegen.moe:sigma_moe",
))
