"""Phase 1 of resolve: the model's width, stem, head and norms (what surrounds the layers).

Bound before the layout, in the order a reader meets them in an error-free spec (width,
stem, head, default norm, final norm), so the first error reported is the first one a
reader would fix, and search choices are asked for in a stable order. Torch-free.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError, did_you_mean
from blockdsl.lang.expr import Scope
from blockdsl.lang.resolve.args import bind_args
from blockdsl.lang.resolve.merge import name_span
from blockdsl.plan import NormPlan
from blockdsl.primitives import HEADS, NORMS, STEMS, Ctx, stem_tokens


class BoundIO(NamedTuple):
    """The bound stem, head and norms, and what the layers need to know of them."""

    d: int
    task: str  # "lm" | "classify"
    seq: int
    stem_call: ir.Call
    stem_args: dict[str, Any]
    head_call: ir.Call
    head_args: dict[str, Any]
    ctx: Ctx  # what every primitive's defaults and checks read
    default_norm: tuple[str, dict[str, Any]]
    final_norm: NormPlan | None


def bind_io(m: dict[str, Any], model: str, scope: Scope) -> BoundIO:
    """Bind width, stem, head and norms of merged model `m` (named `model`)."""
    d = _width(m, model, scope)
    stem_call = _required_call(
        m, model, "stem", STEMS,
        "`stem tokens(vocab=256, context=256)` or `stem patches(image=224, patch=16)`",
    )
    stem_args = _stem(stem_call, scope)
    task = "lm" if stem_call.name == "tokens" else "classify"
    head_call = _required_call(
        m, model, "head", HEADS, "`head lm()` for a language model or `head classify(classes=10)`"
    )
    head_args = _head(head_call, stem_call, stem_args, task, scope)
    seq = stem_tokens(stem_call.name, stem_args)
    causal = task == "lm"
    rope = stem_call.name == "tokens" and stem_args["pos"] == "rope"
    ctx = Ctx(d=d, seq=seq, causal=causal, rope=rope)
    default_norm = _norm_call(m.get("norm"), scope)
    if default_norm[0] == "none":
        raise BlockError(
            "the default norm cannot be none", m["norm"].span, "use norm=none on a sublayer instead"
        )
    if m.get("final_norm"):
        fkind, fargs = _norm_call(m.get("final_norm"), scope, default_norm[0])
    else:
        fkind, fargs = default_norm
    final_norm = None if fkind == "none" else NormPlan(fkind, fargs, "final_norm")
    return BoundIO(
        d, task, seq, stem_call, stem_args, head_call, head_args, ctx, default_norm, final_norm
    )


def _width(m: dict[str, Any], model: str, scope: Scope) -> int:
    if "d" not in m["assigns"]:
        raise BlockError(
            f"model '{model}' does not set its width", name_span(m["model"]),
            "add `d = 512` (the residual width)",
        )
    d = scope.var("d", m["assigns"]["d"].span)
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise BlockError(f"d must be a positive integer, got {d!r}", m["assigns"]["d"].span)
    return d


def _required_call(m: dict[str, Any], model: str, key: str, table: dict, hint: str) -> ir.Call:
    call: ir.Call | None = m.get(key)
    if call is None:
        raise BlockError(f"model '{model}' has no {key}", name_span(m["model"]), f"add {hint}")
    if call.name not in table:
        raise BlockError(f"unknown {key} '{call.name}'", call.span, did_you_mean(call.name, table))
    return call


def _stem(stem_call: ir.Call, scope: Scope) -> dict[str, Any]:
    stem_args, stem_spans = bind_args(
        stem_call, STEMS[stem_call.name], scope, f"stem {stem_call.name}", None
    )
    for k in ("vocab", "context", "image", "patch", "channels"):
        if k in stem_args and stem_args[k] <= 0:
            raise BlockError(
                f"{k}={stem_args[k]} must be positive", stem_spans[k], f"{k} is a size: use {k} >= 1"
            )
    if stem_call.name == "patches" and stem_args["image"] % stem_args["patch"]:
        raise BlockError(
            f"patch={stem_args['patch']} does not divide image={stem_args['image']}",
            stem_spans["patch"],
            "the image is cut into whole patches",
        )
    return stem_args


def _head(
    head_call: ir.Call, stem_call: ir.Call, stem_args: dict[str, Any], task: str, scope: Scope
) -> dict[str, Any]:
    want = "lm" if task == "lm" else "classify"
    if head_call.name != want:
        raise BlockError(
            f"head '{head_call.name}' does not fit stem '{stem_call.name}'",
            head_call.span,
            f"a {stem_call.name} stem needs `head {want}(...)`",
        )
    head_args, head_spans = bind_args(
        head_call, HEADS[head_call.name], scope, f"head {head_call.name}", None
    )
    if head_call.name == "classify" and head_args["pool"] == "cls" and stem_args["cls"] == "none":
        raise BlockError(
            "pool=cls needs a class token, but the stem has cls=none",
            head_spans["pool"],
            "use pool=gap, or give the stem cls=learned",
        )
    if head_call.name == "lm" and head_args["tie"] and stem_call.name != "tokens":
        raise BlockError("tie=true needs a token embedding", head_call.span)
    return head_args


def _norm_call(
    call: ir.Call | None, scope: Scope, default_kind: str = "layernorm"
) -> tuple[str, dict]:
    """A norm statement's kind and bound arguments; no statement: `default_kind`'s defaults."""
    if call is None:
        return default_kind, {k: s.default for k, s in NORMS[default_kind].items()}
    if call.name not in NORMS:
        raise BlockError(f"unknown norm '{call.name}'", call.span, did_you_mean(call.name, NORMS))
    args, _ = bind_args(call, NORMS[call.name], scope, f"norm {call.name}", None)
    return call.name, args
