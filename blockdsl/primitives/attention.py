"""Attention primitives: multi-head attention (`mha`) and SwitchHead (`switchhead`).

FLOPs add 4·T·(heads·head_dim) for the score and value products at sequence length T
(full T, no causal halving, as in the PaLM/nanoGPT MFU convention); softmax is not counted.
"""

from __future__ import annotations

from typing import Any

from blockdsl.names import ATTENTION, ATTENTION_IMPLS
from blockdsl.primitives.base import (
    REQUIRED,
    ArgError,
    ArgSpec,
    BuildEnv,
    Ctx,
    Lowering,
    Primitive,
    Tunable,
    register,
)
from blockdsl.primitives.common import k_le_experts, nonneg, positive, prob
from blockdsl.primitives.memory import MemCtx, dispatch_saves_rows, grid_slots, grid_tiles
from blockdsl.primitives.routing import DISPATCH_ARG, dispatch_tunable


def attention_impl(requested: str, device: Any, precision: str, seq: int) -> str:
    """SDPA unless measured otherwise. On CPU, when the matmuls run in bf16 (bf16 autocast, or
    fp32-medium, which routes fp32 matmuls through oneDNN's bf16 path) at short sequences,
    SDPA's fused kernel is the slow one (its backward in bf16; in fp32-medium it does not
    use the bf16 path at all): explicit batched matmuls with a hand-written backward
    measured 1.3-1.6x SDPA at seq 128-256 here. `compile --tune` overrides this per shape."""
    return requested if requested != "auto" else _auto_impl(device.type, precision, seq)


def _auto_impl(device_type: str, precision: str, seq: int) -> str:
    """`attention_impl`'s default rule on a device type (the memory estimate has no device)."""
    if device_type == "cpu" and precision in ("bf16", "fp32-medium") and seq <= 512:
        return "bmm"
    return "sdpa"


def default_head_dim(ctx: Ctx, a: dict[str, Any]) -> int:
    """d/heads; when heads does not divide d the spec must say head_dim= itself."""
    positive(a, "heads")
    if ctx.d % a["heads"]:
        raise ArgError(
            f"heads={a['heads']} does not divide d={ctx.d}",
            "heads",
            _heads_hint(ctx.d, a["heads"]),
        )
    return ctx.d // a["heads"]


def _divisors(n: int, limit: int = 8, search: int = 4096) -> list[int]:
    """The first `limit` divisors > 1 of n, looking only at candidates up to `search`.

    Bounded work whatever n is (d may be up to 2**62): a hint must not take longer than
    the check it explains. n itself is listed when it is small enough to be found.
    """
    return [i for i in range(2, min(n, search) + 1) if n % i == 0][:limit]


def _heads_hint(d: int, heads: int) -> str:
    """Divisors of d to pick heads from, and the widths near d that `heads` divides."""
    divs = _divisors(d)
    pick = (
        f"pick heads from the divisors of {d} ({', '.join(map(str, divs))}, ...)"
        if divs
        else f"{d} has no divisor up to 4096 but 1"
    )
    below, above = d - d % heads, d - d % heads + heads
    near = " or ".join(f"d={w}" for w in (below, above) if w > 0)
    return f"{pick}, use {near} (multiples of {heads}), or give head_dim="


# ---------------------------------------------------------------- mha
def _mha_check(ctx: Ctx, a: dict[str, Any]) -> None:
    positive(a, "heads", "head_dim")
    positive(a, "kv_heads", "rope_base")
    prob(a, "dropout")
    if a["heads"] % a["kv_heads"]:
        raise ArgError(
            f"kv_heads={a['kv_heads']} does not divide heads={a['heads']}",
            "kv_heads",
            "grouped-query attention shares each key/value head among heads/kv_heads query heads",
        )
    if not 0.0 <= a["rope_fraction"] <= 1.0:
        raise ArgError(f"rope_fraction={a['rope_fraction']} must be in [0, 1]", "rope_fraction")


def _mha_params(ctx: Ctx, a: dict[str, Any]) -> int:
    h, kv, dh, b = a["heads"], a["kv_heads"], a["head_dim"], a["bias"]
    qkv = (h + 2 * kv) * dh
    return ctx.d * qkv + (qkv if b else 0) + h * dh * ctx.d + (ctx.d if b else 0)


def _mha_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    h, kv, dh = a["heads"], a["kv_heads"], a["head_dim"]
    return 2.0 * (ctx.d * (h + 2 * kv) * dh + h * dh * ctx.d) + 4.0 * ctx.seq * h * dh


def _mha_prepare(a: dict[str, Any], env: BuildEnv) -> dict[str, Any]:
    a["impl"] = attention_impl(a["impl"], env.device, env.precision, env.seq)
    return a


def _saves_scores(a: dict[str, Any], m: MemCtx) -> bool:
    """Whether an mha layer runs the explicit-softmax path, which saves the T x T scores.

    Follows `attention_impl`'s default rule (`_auto_impl`): an explicit impl=manual/bmm, the CPU
    bf16/fp32-medium default at seq <= 512, or dropout (bmm falls back to the reference
    path). SDPA's fused kernels save only a log-sum-exp per row. A tuned 'auto' may pick
    either; counting the scores then is the conservative side.
    """
    impl = a.get("impl", "auto")
    if impl == "auto":
        impl = _auto_impl(m.device_type, m.precision, m.seq)
    return impl in ("manual", "bmm") or a.get("dropout", 0.0) > 0


def _mha_memory(m: MemCtx, a: dict[str, Any]) -> tuple[int, int]:
    """The projection input N·d·e, q/k/v N·(h+2·kv)·dh·e (twice with RoPE), the
    output-projection input N·h·dh·e, the log-sum-exp N·h·4; the explicit-softmax path
    adds the scores and probabilities, B·h·T²·(4+e)."""
    n, d, e = m.n, m.d, m.e
    h, kv, dh = a["heads"], a["kv_heads"], a["head_dim"]
    qkv = (h + 2 * kv) * dh * (2 if a["rope"] else 1)
    acts = n * (d + qkv + 2 * h * dh) * e + n * h * 4
    if _saves_scores(a, m):
        acts += m.batch * h * m.seq * m.seq * (4 + e)
    return acts, 0


_SAME = ("heads", "kv_heads", "head_dim", "bias", "causal", "rope", "rope_base",
         "rope_fraction", "dropout", "impl")

MHA = register(Primitive(
    "mha",
    "attn",
    {
        "heads": ArgSpec("int", REQUIRED, doc="query heads"),
        "kv_heads": ArgSpec("int", lambda ctx, a: a["heads"], doc="key/value heads (GQA)"),
        "head_dim": ArgSpec("int", default_head_dim, doc="per-head width (default d/heads)"),
        "bias": ArgSpec("bool", True),
        "causal": ArgSpec("bool", lambda ctx, a: ctx.causal),
        "rope": ArgSpec("bool", lambda ctx, a: ctx.rope),
        "rope_base": ArgSpec("float", 10000.0),
        "rope_fraction": ArgSpec("float", 1.0),
        "dropout": ArgSpec("float", 0.0),
        "impl": ArgSpec("enum", "auto", ATTENTION,
                        doc="attention kernel (auto: tuned, else the measured default)"),
    },
    _mha_check,
    _mha_params,
    lambda ctx, a: float(_mha_params(ctx, a)),
    _mha_flops,
    "multi-head attention: fused QKV, SDPA, GQA, RoPE",
    lowering=Lowering("blockdsl.nn.attention:MultiHeadAttention", {k: k for k in _SAME},
                      prepare=_mha_prepare),
    tunable=Tunable("impl", ATTENTION_IMPLS, "manual",
                    lambda a, env: attention_impl("auto", env.device, env.precision, env.seq)),
    x_norm=True,
    memory=_mha_memory,
    codegen="blockdsl.export.codegen.attention:mha",
))


# ---------------------------------------------------------------- switchhead
def _switchhead_check(ctx: Ctx, a: dict[str, Any]) -> None:
    positive(a, "heads", "head_dim")
    positive(a, "experts", "k")
    if a["experts"] > 1:
        k_le_experts(a)
    nonneg(a, "entropy")


def _switchhead_params(ctx: Ctx, a: dict[str, Any]) -> int:
    h, dh, e, d = a["heads"], a["head_dim"], a["experts"], ctx.d
    qk = 2 * d * h * dh
    if e == 1:  # dense V/O and a sigmoid output gate per head
        return qk + 2 * h * d * dh + h * d
    return qk + 2 * h * e * d * dh + 2 * h * e * d


def _switchhead_active(ctx: Ctx, a: dict[str, Any]) -> float:
    h, dh, e, d = a["heads"], a["head_dim"], a["experts"], ctx.d
    if e == 1:
        return float(_switchhead_params(ctx, a))
    return 2 * d * h * dh + 2 * h * e * d + 2 * h * a["k"] * d * dh


def _switchhead_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    h, dh, e, d = a["heads"], a["head_dim"], a["experts"], ctx.d
    sel = h * d if e == 1 else 2 * h * e * d  # E=1: one output-gate selector per head
    k = 1 if e == 1 else a["k"]
    return 2.0 * (2 * d * h * dh + sel + 2 * h * k * d * dh) + 4.0 * ctx.seq * h * dh


def _switchhead_memory(m: MemCtx, a: dict[str, Any]) -> tuple[int, int]:
    """Input, q, k, the V/O expert inputs and outputs of its k experts, N·h·dh·(3+2k)·e,
    plus fp32 selector logits and probabilities for V and O; with a grid dispatch, every
    padded slot's gathered input and output and "bmm"'s per-tile weight copies."""
    n, d, e = m.n, m.d, m.e
    h, dh, k = a["heads"], a["head_dim"], (a["k"] if a["experts"] > 1 else 1)
    acts = n * d * e + n * h * dh * (5 + 2 * k) * e + n * h * 4
    acts += n * 2 * h * a["experts"] * 8
    if a["experts"] > 1 and dispatch_saves_rows(a.get("dispatch", "auto"), d * dh,
                                                m.device_type, m.precision):
        acts += 2 * grid_slots(n * h * k, h * a["experts"], a) * (d + dh) * e
        acts += 2 * grid_tiles(n * h * k, h * a["experts"], a, e) * d * dh * e
    return acts, 0


SWITCHHEAD = register(Primitive(
    "switchhead",
    "attn",
    {
        "heads": ArgSpec("int", REQUIRED),
        "head_dim": ArgSpec("int", default_head_dim),
        "experts": ArgSpec("int", 1, doc="experts per head on V and O"),
        "k": ArgSpec("int", 2),
        "causal": ArgSpec("bool", lambda ctx, a: ctx.causal),
        "rope": ArgSpec("bool", True),
        "rope_fraction": ArgSpec("float", 0.5),
        "rope_base": ArgSpec("float", 10000.0),
        "entropy": ArgSpec("float", 0.001, doc="entropy regulariser weight"),
        "selector_init": ArgSpec("enum", "row_std", ("row_std", "keep_std"),
                                 doc="V/O selector rows: row_std keeps each row's own std "
                                     "(MoEUT's code), keep_std makes all rows one norm"),
        "dispatch": DISPATCH_ARG,
    },
    _switchhead_check,
    _switchhead_params,
    _switchhead_active,
    _switchhead_flops,
    "SwitchHead attention (MoEUT): per-head experts on V and O",
    lowering=Lowering(
        "blockdsl.nn.switchhead:SwitchHeadAttention",
        {"heads": "heads", "head_dim": "head_dim", "experts": "experts", "k": "k",
         "causal": "causal", "rope": "rope", "rope_fraction": "rope_fraction",
         "rope_base": "rope_base", "entropy": "entropy_weight", "dispatch": "dispatch",
         "selector_init": "selector_init"},
        env={"d": "d", "n_applications": "n_applications"},
    ),
    tunable=dispatch_tunable(lambda a, d: (d, a["head_dim"])),  # V experts: d -> head_dim
    x_norm=True,
    memory=_switchhead_memory,
    codegen="blockdsl.export.codegen.moe:switchhead",
))
