"""Argument binding: a call's arguments evaluated, checked against a schema, defaulted.

One routine for every call in a spec (primitives, stem, head, norms, altup), so that an
argument is coerced and reported alike wherever it is written. Torch-free.
"""

from __future__ import annotations

from typing import Any

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError, did_you_mean
from blockdsl.lang.expr import Scope, Symbol
from blockdsl.primitives import REQUIRED, ArgError, ArgSpec, Ctx


def coerce(spec: ArgSpec, name: str, value: Any, span: ir.Span, scope: Scope, where: str) -> Any:
    """`value` as the type `spec` declares (an integral float as an int), or a located error."""
    def bad(expected: str, hint: str | None = None) -> BlockError:
        if isinstance(value, Symbol) and spec.type != "enum":
            return BlockError(
                f"unknown variable '{value}' for {where} argument '{name}'",
                span,
                did_you_mean(str(value), scope.assigns),
            )
        return BlockError(
            f"{where} argument '{name}' expects {expected}, got {value!r}",
            span,
            hint or (f"{name}: {spec.doc}" if spec.doc else f"write {name}=<{expected}>"),
        )

    if spec.type == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if spec.type in ("float", "optfloat"):
        if spec.type == "optfloat" and isinstance(value, Symbol) and value == "none":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number" + (" or none" if spec.type == "optfloat" else ""))
        if value != value or value in (float("inf"), float("-inf")):
            raise bad("a finite number")
        return float(value)
    if spec.type == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if spec.type == "enum":
        if not isinstance(value, str) or str(value) not in spec.values:
            raise BlockError(
                f"{where} argument '{name}' must be one of {', '.join(spec.values)}; got {value!r}",
                span,
                did_you_mean(str(value), spec.values) if isinstance(value, str) else None,
            )
        return str(value)
    raise AssertionError(spec.type)


def bind_args(
    call: ir.Call,
    schema: dict[str, ArgSpec],
    scope: Scope,
    where: str,
    ctx: Ctx | None,
    extra: dict[str, tuple[Any, ir.Span]] | None = None,
    choice_prefix: str = "",
) -> tuple[dict[str, Any], dict[str, ir.Span]]:
    """Evaluate a call's args against a schema; fill defaults; return values and spans."""
    given: dict[str, tuple[Any, ir.Span]] = {}
    for a in call.args:
        if a.name not in schema:
            raise BlockError(
                f"{where} has no argument '{a.name}'",
                a.span,
                did_you_mean(a.name, schema) + f" (arguments of {call.name}: {', '.join(schema)})",
            )
        if a.name in given:
            raise BlockError(f"argument '{a.name}' is given twice", a.span)
        if isinstance(a.value, ir.Call):
            raise BlockError(f"argument '{a.name}' of {where} takes a value, not a call", a.value.span)
        given[a.name] = (scope.eval(a.value, f"{choice_prefix}{a.name}"), a.span)
    for k, v in (extra or {}).items():
        given[k] = v
    out: dict[str, Any] = {}
    spans: dict[str, ir.Span] = {}
    for name, spec in schema.items():
        if name in given:
            value, span = given[name]
            out[name] = coerce(spec, name, value, span, scope, where)
            spans[name] = span
    for name, spec in schema.items():
        if name in out:
            continue
        if spec.default is REQUIRED:
            raise BlockError(
                f"{where} needs argument '{name}'",
                call.span,
                f"write {call.name}({name}=...)" + (f": {spec.doc}" if spec.doc else ""),
            )
        try:
            out[name] = spec.default(ctx, out) if callable(spec.default) else spec.default
        except ArgError as err:
            raise BlockError(str(err), spans.get(err.arg or "", call.span), err.hint) from None
        spans[name] = call.span
    return {k: out[k] for k in schema if k in out}, spans

