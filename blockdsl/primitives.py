"""The primitives the language knows: argument schemas, checks, parameter and FLOP formulas.

Torch-free, so `blockdsl check` and every summary stay instant. Each formula mirrors the
exact parameter layout of the module in `blockdsl/nn/` that `lower.py` builds for it;
tests assert the two agree for every shipped spec. FLOPs are forward FLOPs per token
with a multiply-add counted as 2; attention adds 4·T·(heads·head_dim) for the score and
value products at sequence length T (full T, no causal halving, as in the PaLM/nanoGPT
MFU convention); norms, activations and softmax are not counted.

Adding a primitive: a schema here, a module in `nn/`, a case in `lower.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu", "reglu")
GATED = ("swiglu", "geglu", "reglu")
DISPATCH = ("auto", "bmm", "grouped_mm", "sort", "loop")


class ArgError(ValueError):
    """A bad argument value; `arg` names it so the caller can point at its text."""

    def __init__(self, message: str, arg: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.arg = arg
        self.hint = hint


@dataclass(frozen=True)
class ArgSpec:
    type: str  # "int", "float", "bool", "enum", "optfloat"
    default: Any = None  # a value, or a callable(ctx) -> value; REQUIRED if missing
    values: tuple[str, ...] = ()
    doc: str = ""


REQUIRED = object()


@dataclass(frozen=True)
class Ctx:
    """What a primitive may read from its model: width, sequence length, task."""

    d: int
    seq: int
    causal: bool
    rope: bool
    n_applications: int = 1


@dataclass(frozen=True)
class Primitive:
    name: str
    family: str  # "attn" | "ffn" | "moe"
    args: dict[str, ArgSpec]
    check: Callable[[Ctx, dict[str, Any]], None]
    params: Callable[[Ctx, dict[str, Any]], int]
    active: Callable[[Ctx, dict[str, Any]], float]
    flops: Callable[[Ctx, dict[str, Any]], float]
    doc: str = ""
    explicit_required: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------- helpers
def _gated(act: str) -> int:
    return 2 if act in GATED else 1


def _mlp_params(d: int, f: int, act: str, bias: bool) -> int:
    g = _gated(act)
    return d * g * f + (g * f if bias else 0) + f * d + (d if bias else 0)


def _mlp_flops(d: int, f: int, act: str) -> float:
    return 2.0 * (d * _gated(act) * f + f * d)


def _positive(a: dict[str, Any], *names: str) -> None:
    for n in names:
        v = a.get(n)
        if v is not None and not isinstance(v, bool) and v <= 0:
            raise ArgError(f"{n}={v} must be positive", n, f"{n} is a size or count: use {n} >= 1")


def _nonneg(a: dict[str, Any], *names: str) -> None:
    for n in names:
        if a.get(n) is not None and a[n] < 0:
            raise ArgError(f"{n}={a[n]} must not be negative", n, f"use {n}=0 to turn it off")


def _prob(a: dict[str, Any], *names: str) -> None:
    for n in names:
        if not 0.0 <= a[n] < 1.0:
            raise ArgError(f"{n}={a[n]} must be in [0, 1)", n, f"{n} is a probability")


def _k_le_experts(a: dict[str, Any]) -> None:
    if a["k"] > a["experts"]:
        raise ArgError(
            f"k={a['k']} exceeds experts={a['experts']}",
            "k",
            "each token picks k distinct experts, so k must be at most the number of experts",
        )


def _head_dim(ctx: Ctx, a: dict[str, Any]) -> int:
    return a["head_dim"]


def _default_head_dim(ctx: Ctx, a: dict[str, Any]) -> int:
    """d/heads; when heads does not divide d the spec must say head_dim= itself."""
    _positive(a, "heads")
    if ctx.d % a["heads"]:
        raise ArgError(
            f"heads={a['heads']} does not divide d={ctx.d}",
            "heads",
            _heads_hint(ctx.d, a["heads"]),
        )
    return ctx.d // a["heads"]


def _check_heads(ctx: Ctx, a: dict[str, Any]) -> None:
    _positive(a, "heads", "head_dim")


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


# ---------------------------------------------------------------- attention
def _mha_check(ctx: Ctx, a: dict[str, Any]) -> None:
    _check_heads(ctx, a)
    _positive(a, "kv_heads", "rope_base")
    _prob(a, "dropout")
    if a["heads"] % a["kv_heads"]:
        raise ArgError(
            f"kv_heads={a['kv_heads']} does not divide heads={a['heads']}",
            "kv_heads",
            "grouped-query attention shares each key/value head among heads/kv_heads query heads",
        )
    if not 0.0 <= a["rope_fraction"] <= 1.0:
        raise ArgError(f"rope_fraction={a['rope_fraction']} must be in [0, 1]", "rope_fraction")


def _mha_params(ctx: Ctx, a: dict[str, Any]) -> int:
    h, kv, dh, b = a["heads"], a["kv_heads"], _head_dim(ctx, a), a["bias"]
    qkv = (h + 2 * kv) * dh
    return ctx.d * qkv + (qkv if b else 0) + h * dh * ctx.d + (ctx.d if b else 0)


def _mha_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    h, kv, dh = a["heads"], a["kv_heads"], _head_dim(ctx, a)
    return 2.0 * (ctx.d * (h + 2 * kv) * dh + h * dh * ctx.d) + 4.0 * ctx.seq * h * dh


def _switchhead_check(ctx: Ctx, a: dict[str, Any]) -> None:
    _check_heads(ctx, a)
    _positive(a, "experts", "k")
    if a["experts"] > 1:
        _k_le_experts(a)
    _nonneg(a, "entropy")


def _switchhead_params(ctx: Ctx, a: dict[str, Any]) -> int:
    h, dh, e, d = a["heads"], _head_dim(ctx, a), a["experts"], ctx.d
    qk = 2 * d * h * dh
    if e == 1:  # dense V/O and a sigmoid output gate per head
        return qk + 2 * h * d * dh + h * d
    return qk + 2 * h * e * d * dh + 2 * h * e * d


def _switchhead_active(ctx: Ctx, a: dict[str, Any]) -> float:
    h, dh, e, d = a["heads"], _head_dim(ctx, a), a["experts"], ctx.d
    if e == 1:
        return float(_switchhead_params(ctx, a))
    return 2 * d * h * dh + 2 * h * e * d + 2 * h * a["k"] * d * dh


def _switchhead_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    h, dh, e, d = a["heads"], _head_dim(ctx, a), a["experts"], ctx.d
    sel = h * d if e == 1 else 2 * h * e * d  # E=1: one output-gate selector per head
    k = 1 if e == 1 else a["k"]
    return 2.0 * (2 * d * h * dh + sel + 2 * h * k * d * dh) + 4.0 * ctx.seq * h * dh


# ---------------------------------------------------------------- dense FFN
def _mlp_check(ctx: Ctx, a: dict[str, Any]) -> None:
    _positive(a, "d_ff")
    _prob(a, "dropout")


# ---------------------------------------------------------------- MoE
def _topk_check(ctx: Ctx, a: dict[str, Any]) -> None:
    _positive(a, "experts", "k", "d_ff")
    _k_le_experts(a)
    cf = a["capacity_factor"]
    if cf is not None and cf <= 0:
        raise ArgError(
            f"capacity_factor={cf} must be positive",
            "capacity_factor",
            "use capacity_factor=none for dropless routing",
        )
    _nonneg(a, "router_noise", "balance_loss", "z_loss", "shared_d_ff")
    _prob(a, "expert_dropout")


def _experts_params(ctx: Ctx, a: dict[str, Any]) -> int:
    return a["experts"] * _mlp_params(ctx.d, a["d_ff"], a["act"], a["bias"])


def _shared_params(ctx: Ctx, a: dict[str, Any]) -> int:
    s = a.get("shared_d_ff", 0)
    return _mlp_params(ctx.d, s, a["act"], a["bias"]) if s else 0


def _topk_params(ctx: Ctx, a: dict[str, Any]) -> int:
    return ctx.d * a["experts"] + _experts_params(ctx, a) + _shared_params(ctx, a)


def _topk_active(ctx: Ctx, a: dict[str, Any]) -> float:
    one = _mlp_params(ctx.d, a["d_ff"], a["act"], a["bias"])
    return ctx.d * a["experts"] + a["k"] * one + _shared_params(ctx, a)


def _topk_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    s = a.get("shared_d_ff", 0)
    shared = _mlp_flops(ctx.d, s, a["act"]) if s else 0.0
    return 2.0 * ctx.d * a["experts"] + a["k"] * _mlp_flops(ctx.d, a["d_ff"], a["act"]) + shared


def _ec_check(ctx: Ctx, a: dict[str, Any]) -> None:
    _positive(a, "experts", "d_ff", "capacity_factor")
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
    one = _mlp_params(ctx.d, a["d_ff"], a["act"], a["bias"])
    return ctx.d * a["experts"] + min(a["capacity_factor"], a["experts"]) * one


def _ec_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    cf = min(a["capacity_factor"], a["experts"])
    return 2.0 * ctx.d * a["experts"] + cf * _mlp_flops(ctx.d, a["d_ff"], a["act"])


def _sigma_check(ctx: Ctx, a: dict[str, Any]) -> None:
    _positive(a, "experts", "k", "expert_size")
    _k_le_experts(a)
    _nonneg(a, "entropy")
    _prob(a, "expert_dropout")


def _sigma_params(ctx: Ctx, a: dict[str, Any]) -> int:
    return a["experts"] * (2 * ctx.d * a["expert_size"] + ctx.d)


def _sigma_active(ctx: Ctx, a: dict[str, Any]) -> float:
    return a["experts"] * ctx.d + a["k"] * 2 * ctx.d * a["expert_size"]


def _sigma_flops(ctx: Ctx, a: dict[str, Any]) -> float:
    return 2.0 * ctx.d * a["experts"] + a["k"] * 4.0 * ctx.d * a["expert_size"]


def _mlp_p(ctx: Ctx, a: dict[str, Any]) -> int:
    return _mlp_params(ctx.d, a["d_ff"], a["act"], a["bias"])


def _d4(ctx: Ctx) -> int:
    return 4 * ctx.d


_ACT = ArgSpec("enum", "gelu", ACTIVATIONS, "activation (gated: swiglu, geglu, reglu)")
_DISPATCH = ArgSpec("enum", "auto", DISPATCH, "MoE dispatch implementation")

PRIMITIVES: dict[str, Primitive] = {
    p.name: p
    for p in [
        Primitive(
            "mha",
            "attn",
            {
                "heads": ArgSpec("int", REQUIRED, doc="query heads"),
                "kv_heads": ArgSpec("int", lambda ctx, a: a["heads"], doc="key/value heads (GQA)"),
                "head_dim": ArgSpec("int", _default_head_dim, doc="per-head width (default d/heads)"),
                "bias": ArgSpec("bool", True),
                "causal": ArgSpec("bool", lambda ctx, a: ctx.causal),
                "rope": ArgSpec("bool", lambda ctx, a: ctx.rope),
                "rope_base": ArgSpec("float", 10000.0),
                "rope_fraction": ArgSpec("float", 1.0),
                "dropout": ArgSpec("float", 0.0),
                "impl": ArgSpec("enum", "auto", ("auto", "sdpa", "bmm", "manual"),
                                doc="attention kernel (auto: tuned, else the measured default)"),
            },
            _mha_check,
            _mha_params,
            lambda ctx, a: float(_mha_params(ctx, a)),
            _mha_flops,
            "multi-head attention: fused QKV, SDPA, GQA, RoPE",
        ),
        Primitive(
            "switchhead",
            "attn",
            {
                "heads": ArgSpec("int", REQUIRED),
                "head_dim": ArgSpec("int", _default_head_dim),
                "experts": ArgSpec("int", 1, doc="experts per head on V and O"),
                "k": ArgSpec("int", 2),
                "causal": ArgSpec("bool", lambda ctx, a: ctx.causal),
                "rope": ArgSpec("bool", True),
                "rope_fraction": ArgSpec("float", 0.5),
                "rope_base": ArgSpec("float", 10000.0),
                "entropy": ArgSpec("float", 0.001, doc="entropy regulariser weight"),
                "dispatch": _DISPATCH,
            },
            _switchhead_check,
            _switchhead_params,
            _switchhead_active,
            _switchhead_flops,
            "SwitchHead attention (MoEUT): per-head experts on V and O",
        ),
        Primitive(
            "mlp",
            "ffn",
            {
                "d_ff": ArgSpec("int", lambda ctx, a: _d4(ctx)),
                "act": _ACT,
                "bias": ArgSpec("bool", True),
                "dropout": ArgSpec("float", 0.0),
            },
            _mlp_check,
            _mlp_p,
            lambda ctx, a: float(_mlp_p(ctx, a)),
            lambda ctx, a: _mlp_flops(ctx.d, a["d_ff"], a["act"]),
            "dense feed-forward",
        ),
        Primitive(
            "topk",
            "moe",
            {
                "experts": ArgSpec("int", REQUIRED),
                "k": ArgSpec("int", 2),
                "d_ff": ArgSpec("int", lambda ctx, a: _d4(ctx)),
                "act": _ACT,
                "bias": ArgSpec("bool", True),
                "capacity_factor": ArgSpec("optfloat", None, doc="none: dropless"),
                "renormalize": ArgSpec("bool", False),
                "router_noise": ArgSpec("float", 0.0),
                "balance_loss": ArgSpec("float", 0.01),
                "z_loss": ArgSpec("float", 0.0),
                "shared_d_ff": ArgSpec("int", 0),
                "expert_dropout": ArgSpec("float", 0.0),
                "dispatch": _DISPATCH,
            },
            _topk_check,
            _topk_params,
            _topk_active,
            _topk_flops,
            "token-choice top-k MoE (Switch/GShard)",
        ),
        Primitive(
            "expert_choice",
            "moe",
            {
                "experts": ArgSpec("int", REQUIRED),
                "capacity_factor": ArgSpec("float", 2.0),
                "d_ff": ArgSpec("int", lambda ctx, a: _d4(ctx)),
                "act": _ACT,
                "bias": ArgSpec("bool", True),
                "group": ArgSpec("enum", "auto", ("auto", "batch", "position")),
                "dispatch": _DISPATCH,
            },
            _ec_check,
            _topk_params,
            _ec_active,
            _ec_flops,
            "expert-choice MoE (Zhou et al. 2022)",
        ),
        Primitive(
            "sigma_moe",
            "moe",
            {
                "experts": ArgSpec("int", REQUIRED),
                "k": ArgSpec("int", REQUIRED),
                "expert_size": ArgSpec("int", 128),
                "act": ArgSpec("enum", "relu", ("relu", "gelu", "gelu_tanh", "silu")),
                "entropy": ArgSpec("float", 0.01),
                "expert_dropout": ArgSpec("float", 0.0),
                "dispatch": _DISPATCH,
            },
            _sigma_check,
            _sigma_params,
            _sigma_active,
            _sigma_flops,
            "sigma-MoE FFN (MoEUT)",
        ),
    ]
}


# ---------------------------------------------------------------- stems, heads, norms
STEMS: dict[str, dict[str, ArgSpec]] = {
    "tokens": {
        "vocab": ArgSpec("int", REQUIRED),
        "context": ArgSpec("int", REQUIRED, doc="training context length"),
        "pos": ArgSpec("enum", "learned", ("learned", "rope", "none")),
        "dropout": ArgSpec("float", 0.0),
    },
    "patches": {
        "image": ArgSpec("int", REQUIRED),
        "patch": ArgSpec("int", REQUIRED),
        "channels": ArgSpec("int", 3),
        "cls": ArgSpec("enum", "learned", ("learned", "zero", "none")),
        "pos": ArgSpec("enum", "learned", ("learned", "none")),
    },
}
HEADS: dict[str, dict[str, ArgSpec]] = {
    "lm": {"tie": ArgSpec("bool", False), "bias": ArgSpec("bool", False)},
    "classify": {
        "classes": ArgSpec("int", REQUIRED),
        "pool": ArgSpec("enum", "cls", ("cls", "gap")),
        "pre_logits": ArgSpec("int", 0, doc="width of a tanh pre-logits layer (0: none)"),
    },
}
NORMS: dict[str, dict[str, ArgSpec]] = {
    "layernorm": {"eps": ArgSpec("float", 1e-5), "bias": ArgSpec("bool", True)},
    "rmsnorm": {"eps": ArgSpec("float", 1e-6)},
    "none": {},
}
ALTUP: dict[str, ArgSpec] = {
    "k": ArgSpec("int", 2, doc="widening factor K"),
    "selection": ArgSpec("enum", "alternating", ("alternating", "same")),
    "mode": ArgSpec("enum", "recycled", ("recycled", "wide")),
}
PLACEMENTS = ("pre", "post", "sandwich", "peri", "none")


def stem_tokens(kind: str, a: dict[str, Any]) -> int:
    if kind == "tokens":
        return a["context"]
    n = (a["image"] // a["patch"]) ** 2
    return n + (1 if a["cls"] != "none" else 0)


def stem_params(kind: str, a: dict[str, Any], d: int) -> int:
    if kind == "tokens":
        return a["vocab"] * d + (a["context"] * d if a["pos"] == "learned" else 0)
    c, p = a["channels"], a["patch"]
    n = stem_tokens(kind, a)
    cls = d if a["cls"] == "learned" else 0
    pos = n * d if a["pos"] == "learned" else 0
    return c * p * p * d + d + cls + pos


def stem_flops(kind: str, a: dict[str, Any], d: int) -> float:
    if kind == "tokens":
        return 0.0
    c, p = a["channels"], a["patch"]
    n_patch = (a["image"] // a["patch"]) ** 2
    return 2.0 * c * p * p * d * n_patch / stem_tokens(kind, a)


def head_params(kind: str, a: dict[str, Any], d: int, vocab: int = 0) -> int:
    if kind == "lm":
        return (0 if a["tie"] else d * vocab) + (vocab if a["bias"] else 0)
    pre = a["pre_logits"]
    width = pre or d
    return (d * pre + pre if pre else 0) + width * a["classes"] + a["classes"]


def head_flops(kind: str, a: dict[str, Any], d: int, vocab: int = 0, tokens: int = 1) -> float:
    if kind == "lm":
        return 2.0 * d * vocab
    pre = a["pre_logits"]
    return 2.0 * ((d * pre if pre else 0) + (pre or d) * a["classes"]) / tokens


def norm_params(kind: str, a: dict[str, Any], d: int) -> int:
    if kind == "layernorm":
        return 2 * d if a["bias"] else d
    if kind == "rmsnorm":
        return d
    return 0


def altup_params(k: int, wrapped_layers: int) -> int:
    return (k * k + k) * wrapped_layers


def altup_flops(k: int, d: int) -> float:
    """Per wrapped layer and token: the K×K mix of K d-wide vectors and the correction."""
    return float((2 * k * k + 3 * k) * d)
