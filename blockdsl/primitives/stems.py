"""Schemas and formulas of what is not a registered primitive: stems, heads, norms, AltUp.

These have a fixed set of kinds the lowering builds by hand (one stem, one head per
model), so they are plain tables rather than registry entries.
"""

from __future__ import annotations

from typing import Any

from blockdsl.names import NORM_KINDS, PLACEMENTS
from blockdsl.primitives.base import REQUIRED, ArgSpec

__all__ = ["ALTUP", "HEADS", "NORMS", "PLACEMENTS", "STEMS", "altup_flops", "altup_params",
           "head_flops", "head_params", "norm_params", "stem_flops", "stem_params",
           "stem_tokens"]

# ---------------------------------------------------------------- stems, heads, norms
STEMS: dict[str, dict[str, ArgSpec]] = {
    "tokens": {
        "vocab": ArgSpec("int", REQUIRED),
        "context": ArgSpec("int", REQUIRED, doc="training context length"),
        "pos": ArgSpec("enum", "learned", ("learned", "rope", "none")),
        "dropout": ArgSpec("float", 0.0),
        "init": ArgSpec("enum", "gpt2", ("gpt2", "fan_in"),
                        doc="token-embedding init: gpt2 = normal std 0.02 (GPT-2's); "
                            "fan_in = normal std 1/sqrt(width) (MoEUT's code)"),
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
# Keyed by blockdsl.names.NORM_KINDS, plus "none" (a norm the language accepts, no module).
NORMS: dict[str, dict[str, ArgSpec]] = {
    "layernorm": {"eps": ArgSpec("float", 1e-5), "bias": ArgSpec("bool", True)},
    "rmsnorm": {"eps": ArgSpec("float", 1e-6)},
    "none": {},
}
assert tuple(k for k in NORMS if k != "none") == NORM_KINDS
ALTUP: dict[str, ArgSpec] = {
    "k": ArgSpec("int", 2, doc="widening factor K"),
    "selection": ArgSpec("enum", "alternating", ("alternating", "same")),
    "mode": ArgSpec("enum", "recycled", ("recycled", "wide")),
}


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
