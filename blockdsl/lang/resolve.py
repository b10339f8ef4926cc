"""Resolve: IR + (optional) choice assignment -> a concrete Plan of layer instances.

Binds search choices, evaluates variables (lazily, so a derived model's overrides reach
everything that depends on them), expands `repeat`, groups and patterns, fills argument
defaults, checks every argument, and decides which parameter group each instance owns
or shares. Everything it rejects is a located `BlockError`. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from blockdsl.lang import ir
from blockdsl.lang.errors import MAX_INT, BlockError, bounded, brief, did_you_mean
from blockdsl.lang.expr import ChoiceDef, Chooser, first_option
from blockdsl.plan import LayerPlan, NormPlan, Plan
from blockdsl.primitives import (
    ALTUP,
    HEADS,
    NORMS,
    PLACEMENTS,
    PRIMITIVES,
    REQUIRED,
    STEMS,
    ArgError,
    ArgSpec,
    Ctx,
    head_params,
    stem_params,
    stem_tokens,
)

# ---------------------------------------------------------------- the Plan


def depends_on_choice(e: Any, assigns: dict[str, ir.Assign]) -> bool:
    """Whether expression `e` reads a variable that is, or is computed from, a choice.

    A walk with an explicit stack that visits each variable once: variables may refer to
    each other many times over (`v1 = v0 + v0`, `v2 = v1 + v1`, ...), where a recursive
    walk re-entering every reference takes 2**depth steps, and chains may be deeper than
    Python's recursion limit.
    """
    todo: list[Any] = [e]
    seen: set[str] = set()
    while todo:
        x = todo.pop()
        if isinstance(x, ir.Choice):
            return True
        if isinstance(x, ir.Name):
            a = assigns.get(x.id)
            if a is not None and x.id not in seen:
                seen.add(x.id)
                todo.append(a.value)
        elif isinstance(x, (tuple, list)):
            todo.extend(x)
        elif isinstance(x, ir.Node) and not isinstance(x, ir.Span):
            todo.extend(getattr(x, f) for f in type(x).model_fields)
    return False


def _inline_choice(e: Any) -> ir.Choice | None:
    """A choice written inside `e` itself (not reached through a variable), or None."""
    todo: list[Any] = [getattr(e, f) for f in type(e).model_fields]
    while todo:
        x = todo.pop()
        if isinstance(x, ir.Choice):
            return x
        if isinstance(x, (tuple, list)):
            todo.extend(x)
        elif isinstance(x, ir.Node) and not isinstance(x, ir.Span):
            todo.extend(getattr(x, f) for f in type(x).model_fields)
    return None


# ---------------------------------------------------------------- evaluation

_FUNCS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "int": int,
    "round": round,
    "ceil": math.ceil,
    "floor": math.floor,
    "sqrt": math.sqrt,
}


__all__ = ["MAX_INT", "MAX_INSTANCES", "MAX_PARAMS", "Plan", "resolve"]
MAX_INSTANCES = 100_000  # sublayer instances in one model
# Stored parameters of one model: ~500x the largest models trained so far. Every size is
# a bounded integer, but their products are not: d_ff=2**62 is a "valid" 3e20-parameter
# layer. Past this a spec is a typo, and lowering it would only exhaust memory.
MAX_PARAMS = 10**15
_MAX_ROUND_DIGITS = 400  # round(x, n): int rounding builds 10**|n|


def _bounded(v: Any, e: ir.Expr) -> Any:
    return bounded(v, e.span)


def _pow(left: int | float, right: int | float, e: ir.Expr) -> int | float:
    """`left ** right`, refused *before* computing when the result would be too large.

    Python's semantics otherwise: a negative exponent gives a float (2 ** -1 == 0.5,
    2 ** -1100 == 0.0), which is fine wherever a float may stand and a located "must be
    an integer" error where one may not.
    """
    mag = abs(left)
    if right > 0 and mag > 1:
        bits = right * math.log2(mag)  # log2 of the result's magnitude
        limit = 62 if isinstance(left, int) and isinstance(right, int) else 1024
        if bits > limit:
            raise BlockError(
                f"{brief(left)} ** {brief(right)} is too large (about 2**{brief(int(bits))})",
                e.span,
                "integers are capped at 2**62 and floats near 1.8e308",
            )
    if right < 0 and 0 < mag < 1:
        bits = -right * -math.log2(mag)
        if bits > 1024:
            raise BlockError(
                f"{brief(left)} ** {brief(right)} is too large", e.span, "floats stop near 1.8e308"
            )
    return left**right


# How deep variables may refer to variables that refer to variables (real specs: a few).
MAX_VAR_DEPTH = 100


class _Unbound(Exception):
    """Raised while checking unused variables when one would bind a new search choice."""


class _Symbol(str):
    """A bare name that is not a variable (`act=gelu`); remembers where it was."""

    span: ir.Span


class _Scope:
    def __init__(self, assigns: dict[str, ir.Assign], chooser: Chooser, bound: dict[str, Any]):
        self.assigns = assigns
        self.chooser = chooser
        self.bound = bound  # choice name -> value (ties repeated uses of one choice)
        self.defs: dict[str, ChoiceDef] = {}
        self.cache: dict[str, Any] = {}
        self.active: list[str] = []
        self.probing = False

    def var(self, name: str, span: ir.Span) -> Any:
        if name in self.cache:
            return self.cache[name]
        a = self.assigns[name]
        if name in self.active:
            chain = " -> ".join(self.active[self.active.index(name) :] + [name])
            raise BlockError(f"variable '{name}' depends on itself ({chain})", a.span)
        if len(self.active) >= MAX_VAR_DEPTH:
            # Evaluation recurses once per variable: a long chain would hit Python's
            # recursion limit (an internal error) long before it meant anything.
            raise BlockError(
                f"variables nested more than {MAX_VAR_DEPTH} deep "
                f"({self.active[0]} -> {self.active[1]} -> ... -> {name})",
                a.span,
                "a variable reads one that reads another, and so on: shorten the chain",
            )
        self.active.append(name)
        try:
            if isinstance(a.value, ir.Choice):
                value = self.choice(a.value, name)
            elif isinstance(a.value, ir.Call):
                raise BlockError(
                    f"variable '{name}' holds a call; only numbers, names and choices may be assigned",
                    a.value.span,
                )
            else:
                value = self.eval(a.value, name)
        except RecursionError:
            # Fewer than MAX_VAR_DEPTH variables, each deeply nested (`v1 = ------v2`):
            # Python's stack runs out first. Raised where it ran out; an outer variable
            # catches it instead if even this needs more stack than is left.
            raise BlockError(
                f"variable '{name}' is nested too deeply (variables within expressions within "
                "variables)",
                a.span,
                "simplify the expressions or shorten the chain of variables",
            ) from None
        finally:
            self.active.pop()
        self.cache[name] = value
        return value

    def choice(self, c: ir.Choice, name: str) -> Any:
        if name in self.bound:
            return self.bound[name]
        if self.probing:
            raise _Unbound(name)
        opts = c.options
        for o in opts:
            inner = _inline_choice(o)
            if inner is not None:
                # It would be a second choice under this one's name, sampled apart from
                # the option picked (the two disagree in the trial's parameters).
                raise BlockError(
                    "a choice inside a choice",
                    inner.span,
                    "flatten it ({32 | 64 | 128}), or name the inner one (x = {32 | 64}) "
                    "and use the name ({x | 128})",
                )
        if len(opts) == 1 and opts[0].value is None:
            o = opts[0]
            lo, hi = self.eval(o.lo, name), self.eval(o.hi, name)
            step = self.eval(o.step, name) if o.step is not None else None
            is_int = all(isinstance(v, int) for v in (lo, hi) + ((step,) if step else ()))
            if lo > hi:
                raise BlockError(f"empty range: {lo} .. {hi}", o.span, "write the low end first")
            if o.log and lo <= 0:
                raise BlockError("a log range needs a positive low end", o.span)
            cdef = ChoiceDef(
                name, "int" if is_int and not o.log else "float", (), lo, hi, step, o.log, c.span
            )
            if is_int and o.log:
                cdef = ChoiceDef(name, "int", (), lo, hi, None, True, c.span)
        else:
            values = []
            for o in opts:
                if o.value is None:
                    raise BlockError(
                        "a range cannot be mixed with other options in one choice",
                        o.span,
                        "write either {a | b | c} or {lo .. hi step s}",
                    )
                values.append(self.eval(o.value, name))
            if len(set(map(repr, values))) != len(values):
                raise BlockError("a choice lists the same option twice", c.span)
            dynamic = any(depends_on_choice(o.value, self.assigns) for o in opts)
            cdef = ChoiceDef(name, "categorical", tuple(values), span=c.span, dynamic=dynamic)
        self.defs[name] = cdef
        value = self.chooser(cdef)
        self.bound[name] = value
        return value

    def eval(self, e: ir.Expr | ir.Call, ctx_name: str) -> Any:
        if isinstance(e, ir.Num):
            return _bounded(e.value, e)
        if isinstance(e, (ir.Str, ir.Bool)):
            return e.value
        if isinstance(e, ir.Name):
            if e.id in self.assigns:
                return self.var(e.id, e.span)
            sym = _Symbol(e.id)
            sym.span = e.span
            return sym
        if isinstance(e, ir.Neg):
            v = self.eval(e.operand, ctx_name)
            self._num(v, e.operand)
            return _bounded(-v, e)
        if isinstance(e, ir.BinOp):
            left, right = self.eval(e.left, ctx_name), self.eval(e.right, ctx_name)
            self._num(left, e.left)
            self._num(right, e.right)
            try:
                if e.op == "+":
                    return _bounded(left + right, e)
                if e.op == "-":
                    return _bounded(left - right, e)
                if e.op == "*":
                    return _bounded(left * right, e)
                if e.op == "/":
                    ints = isinstance(left, int) and isinstance(right, int)
                    if ints and right and left % right == 0:
                        return _bounded(left // right, e)  # d/heads stays an int (exactly)
                    return _bounded(left / right, e)
                if e.op == "//":
                    return _bounded(left // right, e)
                if e.op == "%":
                    return _bounded(left % right, e)
                return _bounded(_pow(left, right, e), e)
            except ZeroDivisionError:
                raise BlockError("division by zero", e.span, "check the divisor's value") from None
            except OverflowError:
                raise BlockError("number too large", e.span, "floats stop near 1.8e308") from None
        if isinstance(e, ir.Func):
            fn = _FUNCS.get(e.name)
            if fn is None:
                raise BlockError(f"unknown function '{e.name}'", e.span, did_you_mean(e.name, _FUNCS))
            args = [self.eval(a, ctx_name) for a in e.args]
            for a, node in zip(args, e.args):
                self._num(a, node)
            if e.name == "round" and len(args) == 2 and abs(args[1]) > _MAX_ROUND_DIGITS:
                raise BlockError(
                    f"round(): {brief(args[1])} digits is too many",
                    e.args[1].span,
                    f"round to at most {_MAX_ROUND_DIGITS} digits either side of the point",
                )
            try:
                return _bounded(fn(*args), e)
            except (TypeError, ValueError, OverflowError) as err:
                raise BlockError(f"{e.name}(): {err}", e.span) from None
        if isinstance(e, ir.Choice):
            return self.choice(e, ctx_name)
        if isinstance(e, ir.Call):
            return e  # nested calls are interpreted by their consumer
        raise BlockError(f"cannot evaluate {type(e).__name__}", getattr(e, "span", None))

    def integer(
        self, e: ir.Expr, what: str, lo: int = 1, hi: int | None = None, name: str | None = None
    ) -> int:
        """Evaluate `e` as an integer in [lo, hi], or raise a located error saying why not.

        `name` names an inline search choice in `e` (e.g. `cell.slots`)."""
        v = self.eval(e, name or what)
        self._num(v, e)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            rng = (
                f"an integer in {lo}..{hi}"
                if hi is not None
                else "a positive integer"
                if lo == 1
                else f"an integer >= {lo}"
            )
            raise BlockError(f"{what} must be {rng}, got {v!r}", e.span, f"{what} counts whole things")
        return v

    def _num(self, v: Any, node: Any) -> None:
        if isinstance(v, _Symbol):
            raise BlockError(f"unknown variable '{v}'", node.span, did_you_mean(str(v), self.assigns))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BlockError(f"expected a number, got {v!r}", node.span)


# ---------------------------------------------------------------- argument binding


def _coerce(spec: ArgSpec, name: str, value: Any, span: ir.Span, scope: _Scope, where: str) -> Any:
    def bad(expected: str, hint: str | None = None) -> BlockError:
        if isinstance(value, _Symbol) and spec.type != "enum":
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
        if spec.type == "optfloat" and isinstance(value, _Symbol) and value == "none":
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


def _bind_args(
    call: ir.Call,
    schema: dict[str, ArgSpec],
    scope: _Scope,
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
            out[name] = _coerce(spec, name, value, span, scope, where)
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


# ---------------------------------------------------------------- model merging


def _merge(module: ir.Module, name: str, span: ir.Span | None) -> dict[str, Any]:
    """Flatten a model's `extends` chain: the derived model's statements win."""
    chain: list[ir.Model] = []
    seen: set[str] = set()
    cur = module.model(name)
    if cur is None:
        raise BlockError(
            f"no model named '{name}'", span, did_you_mean(name, [m.name for m in module.models])
        )
    while cur is not None:
        if cur.name in seen:
            raise BlockError(
                f"'{cur.name}' extends itself (through {' -> '.join(m.name for m in chain)})",
                cur.span,
            )
        seen.add(cur.name)
        chain.append(cur)
        if cur.extends is None:
            break
        base = module.model(cur.extends)
        if base is None:
            raise BlockError(
                f"'{cur.name}' extends unknown model '{cur.extends}'",
                cur.span,
                did_you_mean(cur.extends, [m.name for m in module.models]),
            )
        cur = base
    merged: dict[str, Any] = {
        "assigns": {a.name: a for a in module.assigns},
        "blocks": {b.name: b for b in module.blocks},
    }
    for m in reversed(chain):
        merged["assigns"].update({a.name: a for a in m.assigns})
        merged["blocks"].update({b.name: b for b in m.blocks})
        for key in ("stem", "head", "norm", "final_norm", "altup", "baseline", "budget"):
            if getattr(m, key) is not None:
                merged[key] = getattr(m, key)
        for key in ("layout", "objectives", "constraints"):
            if getattr(m, key):
                merged[key] = getattr(m, key)
    merged["model"] = chain[0]
    return merged


def _name_span(m: ir.Model) -> ir.Span:
    """The `model NAME` words of a model's first line: where whole-model errors point."""
    kw = "space " if m.is_space else "model "
    s = m.span
    return ir.Span.model_construct(
        file=s.file, line=s.line, col=s.col, end_line=s.line, end_col=s.col + len(kw) + len(m.name)
    )


def merged(module: ir.Module, name: str) -> dict[str, Any]:
    """A model's (or space's) statements with its `extends` chain applied.

    Keys: assigns, blocks, stem, head, norm, final_norm, altup, layout, and for spaces
    objectives, constraints, baseline, budget (absent keys were never given).
    """
    return _merge(module, name, None)


def eval_expr(e: ir.Expr, variables: dict[str, Any]) -> Any:
    """Evaluate an expression with numeric `variables` bound (e.g. `1.0 * baseline`)."""
    assigns = {
        k: ir.Assign.model_construct(name=k, value=ir.Num.model_construct(value=v, span=e.span), span=e.span)
        for k, v in variables.items()
    }
    return _Scope(assigns, first_option, {}).eval(e, "")


# ---------------------------------------------------------------- resolve


def _indices(idx: ir.Index, n: int, scope: _Scope) -> list[int]:
    def one(e: ir.Expr) -> int:
        v = scope.eval(e, "index")
        scope._num(v, e)
        if isinstance(v, bool) or not isinstance(v, int):
            raise BlockError(
                f"a repeat index must be an integer, got {v!r}",
                e.span,
                "repeats are numbered 0, 1, ...; negative indices count from the end",
            )
        w = v + n if v < 0 else v
        if not 0 <= w < n:
            raise BlockError(
                f"repeat index {v} is out of range",
                e.span,
                f"this repeat has indices 0..{n - 1} (or -{n}..-1 from the end)",
            )
        return w

    start = one(idx.start)
    if idx.stop is None:
        return [start]
    stop = one(idx.stop)
    if stop < start:
        raise BlockError(f"empty index range {start}..{stop}", idx.span, "write the low end first")
    step = 1 if idx.step is None else scope.integer(idx.step, "a repeat index step")
    return list(range(start, stop + 1, step))


def resolve(
    module: ir.Module,
    model: str | None = None,
    assignment: dict[str, Any] | None = None,
    chooser: Chooser | None = None,
) -> Plan:
    """Resolve one model of `module` (default: the last one its own file defines).

    `assignment` binds choices by name; `chooser` is asked for any choice not in it
    (the search passes Optuna's suggest here); without either, a choice takes its first
    option.
    """
    if model is None:
        if not module.own_models:
            raise BlockError(f"{module.file} defines no model", None, "add `model NAME { ... }`")
        model = module.own_models[-1]
    m = _merge(module, model, None)
    mdl: ir.Model = m["model"]
    bound = dict(assignment or {})
    scope = _Scope(m["assigns"], chooser or first_option, bound)

    # ---- width
    if "d" not in m["assigns"]:
        raise BlockError(
            f"model '{model}' does not set its width", _name_span(mdl), "add `d = 512` (the residual width)"
        )
    d = scope.var("d", m["assigns"]["d"].span)
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise BlockError(f"d must be a positive integer, got {d!r}", m["assigns"]["d"].span)

    # ---- stem and head
    def required_call(key: str, table: dict, hint: str) -> ir.Call:
        call: ir.Call | None = m.get(key)
        if call is None:
            raise BlockError(f"model '{model}' has no {key}", _name_span(mdl), f"add {hint}")
        if call.name not in table:
            raise BlockError(f"unknown {key} '{call.name}'", call.span, did_you_mean(call.name, table))
        return call

    stem_call = required_call(
        "stem", STEMS, "`stem tokens(vocab=256, context=256)` or `stem patches(image=224, patch=16)`"
    )
    stem_args, stem_spans = _bind_args(
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
    task = "lm" if stem_call.name == "tokens" else "classify"
    head_call = required_call(
        "head", HEADS, "`head lm()` for a language model or `head classify(classes=10)`"
    )
    want = "lm" if task == "lm" else "classify"
    if head_call.name != want:
        raise BlockError(
            f"head '{head_call.name}' does not fit stem '{stem_call.name}'",
            head_call.span,
            f"a {stem_call.name} stem needs `head {want}(...)`",
        )
    head_args, head_spans = _bind_args(
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
    seq = stem_tokens(stem_call.name, stem_args)
    stored = 0  # stored parameters of the layers so far (capped at MAX_PARAMS)
    causal = task == "lm"
    rope = stem_call.name == "tokens" and stem_args["pos"] == "rope"
    base_ctx = Ctx(d=d, seq=seq, causal=causal, rope=rope)

    # ---- norms
    def norm_call(call: ir.Call | None, default_kind: str = "layernorm") -> tuple[str, dict]:
        if call is None:
            return default_kind, {k: s.default for k, s in NORMS[default_kind].items()}
        if call.name not in NORMS:
            raise BlockError(f"unknown norm '{call.name}'", call.span, did_you_mean(call.name, NORMS))
        args, _ = _bind_args(call, NORMS[call.name], scope, f"norm {call.name}", None)
        return call.name, args

    default_norm = norm_call(m.get("norm"))
    if default_norm[0] == "none":
        raise BlockError(
            "the default norm cannot be none", m["norm"].span, "use norm=none on a sublayer instead"
        )
    fkind, fargs = norm_call(m.get("final_norm"), default_norm[0]) if m.get("final_norm") else default_norm
    final_norm = None if fkind == "none" else NormPlan(fkind, fargs, "final_norm")

    # ---- layout: expand repeats and patterns into units of sublayer instances
    layout: tuple = m.get("layout", ())
    if not layout:
        raise BlockError(
            f"model '{model}' has no layers", _name_span(mdl), "add `repeat N BLOCK` or a `pattern`"
        )
    blocks: dict[str, ir.Block] = m["blocks"]
    # per unit: (block, repeat, item, forced call, overrides, key base, norm key base)
    units: list[list[tuple]] = []
    n_inst = 0  # sublayer instances in `units` so far (a running count: no quadratic sums)

    # Two statements that repeat the same block (or two patterns) are distinct layers;
    # only share=, norm_share= and groups= make instances share parameters.
    stmt_seen: dict[str, int] = {}

    def stmt_prefix(name: str) -> str:
        k = stmt_seen.get(name, 0)
        stmt_seen[name] = k + 1
        return name if k == 0 else f"{name}#{k}"

    for stmt in layout:
        if isinstance(stmt, ir.Pattern):
            pfx = stmt_prefix("pattern")
            letters = {ld.letter: ld for ld in stmt.letters}
            text = stmt.text.replace(" ", "")
            if not text:
                raise BlockError("an empty pattern", stmt.span)
            if n_inst + len(text) > MAX_INSTANCES:
                raise BlockError(
                    f"a pattern of {len(text):,} letters makes more than {MAX_INSTANCES:,} instances",
                    stmt.span,
                    "is the pattern a typo?",
                )
            n_inst += len(text)
            for i, ch in enumerate(text):
                if ch not in letters:
                    raise BlockError(
                        f"pattern letter '{ch}' is not bound",
                        stmt.span,
                        f"bind it: {ch}=mlp(...); bound letters: {', '.join(letters) or 'none'}",
                    )
                ld = letters[ch]
                sub = ir.Sublayer.model_construct(
                    label=ch,
                    prims=(ld.call,),
                    norm=stmt.norm,
                    share=stmt.share,
                    norm_share=stmt.norm_share,
                    span=ld.span,
                )
                units.append([("pattern", i, sub, ld.call, {}, f"{pfx}.{i}.{ch}", f"{pfx}.{i}.{ch}")])
            continue
        rep: ir.Repeat = stmt
        blk = blocks.get(rep.block)
        if blk is None:
            raise BlockError(
                f"unknown block '{rep.block}'",
                rep.block_span or rep.span,
                did_you_mean(rep.block, blocks),
            )
        pfx = stmt_prefix(blk.name)
        n = scope.integer(rep.count, "the repeat count", name=f"{pfx}.repeat")
        groups = n
        if rep.groups is not None:
            groups = scope.integer(rep.groups, "groups", name=f"{pfx}.groups")
            if groups > n:
                raise BlockError(
                    f"groups={groups} exceeds the repeat count {n}",
                    rep.groups.span,
                    "groups is the number of distinct copies of the block; at most the repeat count",
                )
        order = rep.order or "abab"
        if order not in ("abab", "aabb"):
            raise BlockError(
                f"order must be abab or aabb, got '{order}'",
                rep.span,
                "abab applies copies 0,1,0,1,...; aabb applies copy 0 n/G times, then copy 1, ...",
            )
        if order == "aabb" and n % groups:
            raise BlockError(
                f"order=aabb needs the repeat count {n} to be a multiple of groups={groups}", rep.span
            )
        # Expand block items (slots become s0..s{N-1}).
        items: list[ir.Sublayer] = []
        labels: set[str] = set()
        for it in blk.items:
            if isinstance(it, ir.Slots):
                cnt = scope.integer(it.count, "the slots count", 1, 1000, name=f"{blk.name}.slots")
                for j in range(cnt):
                    items.append(
                        ir.Sublayer.model_construct(
                            label=f"s{j}",
                            prims=it.prims,
                            norm=it.norm,
                            share=it.share,
                            norm_share=it.norm_share,
                            span=it.span,
                            choice_span=it.span,
                        )
                    )
            else:
                items.append(it)
        for it in items:
            if it.label in labels:
                raise BlockError(
                    f"block '{blk.name}' has two sublayers named '{it.label}'",
                    it.span,
                    "labels name sublayers for overrides and reports; make them unique",
                )
            labels.add(it.label)
        # Checked before overrides expand index ranges: `at 0..N` is as long as the repeat.
        if n_inst + n * len(items) > MAX_INSTANCES:
            raise BlockError(
                f"repeat {n:,} x {len(items)} sublayers is more than {MAX_INSTANCES:,} instances",
                rep.count.span,
                "is the repeat count a typo?",
            )
        n_inst += n * len(items)
        # Per-repeat overrides.
        per_rep: dict[int, dict[str, list[ir.Override]]] = {}
        for ov in rep.overrides:
            if ov.target not in labels:
                raise BlockError(
                    f"block '{blk.name}' has no sublayer '{ov.target}'",
                    ov.span,
                    did_you_mean(ov.target, labels),
                )
            for idx in ov.indices:
                for i in _indices(idx, n, scope):
                    per_rep.setdefault(i, {}).setdefault(ov.target, []).append(ov)
        for i in range(n):
            copy = i % groups if order == "abab" else i // (n // groups)
            unit = []
            for it in items:
                base = f"{pfx}.{i}.{it.label}" if groups == n else f"{pfx}[{copy}].{it.label}"
                unit.append((blk.name, i, it, None, per_rep.get(i, {}).get(it.label, []), base, base))
            units.append(unit)

    # ---- bind each instance: choose the primitive, evaluate args, check, key.
    layers: list[LayerPlan] = []
    norm_sigs: dict[str, tuple[tuple, ir.Span]] = {}
    prim_sigs: dict[str, tuple[tuple, ir.Span]] = {}
    for u, unit in enumerate(units):
        for blk_name, rep_i, it, forced, ovs, key_base, norm_base in unit:
            call = forced or it.prims[0]
            if forced is None and len(it.prims) > 1:
                names = [p.name for p in it.prims]
                if len(set(names)) != len(names):
                    raise BlockError("a primitive choice lists one primitive twice", it.span)
                cname = f"{blk_name}.{it.label}"
                picked = scope.choice(
                    ir.Choice.model_construct(
                        options=tuple(
                            ir.ChoiceOption.model_construct(
                                value=ir.Str.model_construct(value=p.name, span=p.span), span=p.span
                            )
                            for p in it.prims
                        ),
                        span=it.choice_span or it.span,
                    ),
                    cname,
                )
                call = next(p for p in it.prims if p.name == picked)
            extra: dict[str, tuple[Any, ir.Span]] = {}
            for ov in ovs:
                if ov.field is None:
                    if not isinstance(ov.value, ir.Call):
                        raise BlockError(
                            f"`at ...: {ov.target} = ...` replaces the primitive and needs a call",
                            ov.span,
                            f"write {ov.target} = mlp(...), or {ov.target}.ARG = value",
                        )
                    call, extra = ov.value, {}
            prim = PRIMITIVES.get(call.name)
            if prim is None:
                known = list(PRIMITIVES)
                raise BlockError(
                    f"unknown primitive '{call.name}'",
                    call.span,
                    did_you_mean(call.name, known),
                )
            for ov in ovs:
                if ov.field is not None:
                    if ov.field not in prim.args:
                        raise BlockError(
                            f"{call.name} has no argument '{ov.field}'",
                            ov.span,
                            did_you_mean(ov.field, prim.args),
                        )
                    if isinstance(ov.value, ir.Call):
                        raise BlockError("an argument override takes a value, not a call", ov.span)
                    extra[ov.field] = (scope.eval(ov.value, f"{blk_name}.{it.label}.{ov.field}"), ov.span)
            key = f"share:{it.share}" if it.share else key_base
            # How many times this parameter group is applied is known only after all
            # instances are bound; MoEUT's init needs it, so it is filled in below.
            ctx = base_ctx
            args, spans = _bind_args(
                call,
                prim.args,
                scope,
                f"primitive {call.name}",
                ctx,
                extra,
                choice_prefix=f"{blk_name}.{it.label}.",
            )
            if ctx.causal and args.get("causal") is False:
                raise BlockError(
                    "causal=false in a language model lets each position see the token it must predict",
                    spans.get("causal", call.span),
                    "language models train on next-token prediction; drop causal=false",
                )
            try:
                prim.check(ctx, args)
            except ArgError as err:
                raise BlockError(str(err), spans.get(err.arg or "", call.span), err.hint) from None
            if key not in prim_sigs:  # a parameter group's first use: count it once
                stored += prim.params(ctx, args)
                if stored > MAX_PARAMS:
                    _too_many_params(stored, call.span, f"{blk_name}[{rep_i}].{it.label}")
            # Norms.
            nopt = it.norm
            placement = nopt.placement if nopt else "pre"
            if placement not in PLACEMENTS:
                raise BlockError(
                    f"unknown norm placement '{placement}'",
                    nopt.span if nopt else it.span,
                    did_you_mean(placement, PLACEMENTS),
                )
            if nopt and nopt.kind:
                if nopt.kind not in NORMS or nopt.kind == "none":
                    raise BlockError(
                        f"unknown norm kind '{nopt.kind}'",
                        nopt.span,
                        did_you_mean(nopt.kind, ["layernorm", "rmsnorm"]),
                    )
                nkind, nargs = nopt.kind, {k: s.default for k, s in NORMS[nopt.kind].items()}
                if nopt.kind == default_norm[0]:
                    nargs = default_norm[1]
            else:
                nkind, nargs = default_norm
            if placement == "peri" and prim.family == "ffn":
                n_norms = 0  # peri-norm only feeds projections followed by softmax/sigmoid
            else:
                n_norms = {"none": 0, "sandwich": 2}.get(placement, 1)
            nbase = f"normshare:{it.norm_share}" if it.norm_share else f"{norm_base}.norm"
            norms = tuple(NormPlan(nkind, nargs, f"{nbase}{j}") for j in range(n_norms))
            layer = LayerPlan(
                index=len(layers),
                unit=u,
                block=blk_name,
                repeat=rep_i,
                label=it.label,
                prim=call.name,
                family=prim.family,
                args=args,
                placement=placement,
                norms=norms,
                key=key,
                span=call.span,
            )
            # A sharing group's members must agree, or there is no one module to share.
            sig = layer.signature()
            if key in prim_sigs and prim_sigs[key][0] != sig:
                first = prim_sigs[key][1]
                how = f"share={it.share}" if it.share else "the same copy of a grouped repeat (groups=)"
                raise BlockError(
                    f"sublayers sharing weights through {how} disagree: "
                    f"{_sig_text(sig)} here vs {_sig_text(prim_sigs[key][0])} at {first}",
                    call.span,
                    "shared weights need one shape: give them the same arguments"
                    + (
                        ", or different share= names"
                        if it.share
                        else ", or override all repeats of a copy alike"
                    ),
                )
            prim_sigs.setdefault(key, (sig, call.span))
            for nrm in norms:
                nsig = nrm.signature()
                if nrm.key in norm_sigs and norm_sigs[nrm.key][0] != nsig:
                    group = it.norm_share or nrm.key
                    raise BlockError(
                        f"norms sharing '{group}' disagree: {nsig[0]} here vs "
                        f"{norm_sigs[nrm.key][0][0]} at {norm_sigs[nrm.key][1]}",
                        nopt.span if nopt else it.span,
                        "a shared norm is one module: give its users the same norm kind, "
                        "or a different norm_share= name",
                    )
                norm_sigs.setdefault(nrm.key, (nsig, it.span))
            layers.append(layer)

    # After the layers, so an argument error in a layer (e.g. heads) is reported first.
    stored += stem_params(stem_call.name, stem_args, d) + head_params(
        head_call.name, head_args, d, stem_args.get("vocab", 0)
    )
    if stored > MAX_PARAMS:
        _too_many_params(stored, stem_call.span, "the stem and head")

    # ---- AltUp
    altup = None
    if m.get("altup") is not None:
        acall: ir.Call = m["altup"]
        if acall.name != "altup":
            raise BlockError(f"unknown widening '{acall.name}'", acall.span, "did you mean 'altup'?")
        altup, aspans = _bind_args(acall, ALTUP, scope, "altup", None)
        if altup["k"] < 1:
            raise BlockError(
                f"altup k={altup['k']} must be at least 1",
                aspans["k"],
                "k is the widening factor; k=1 is the plain model",
            )
        if altup["k"] > len(units):
            raise BlockError(
                f"altup k={altup['k']} exceeds the {len(units)} layers it wraps",
                aspans["k"],
                "with alternating selection every sub-block should be computed at least once; "
                "use k <= number of block applications",
            )

    variables = {}
    scope.probing = True  # a variable that would bind a new choice stays unevaluated
    for name in m["assigns"]:
        try:
            variables[name] = scope.var(name, m["assigns"][name].span)
        except _Unbound:
            continue
    scope.probing = False
    return Plan(
        name=model,
        file=module.file,
        d=d,
        task=task,
        seq=seq,
        stem=(stem_call.name, stem_args),
        head=(head_call.name, head_args),
        final_norm=final_norm,
        altup=altup,
        layers=tuple(layers),
        n_units=len(units),
        variables={k: (str(v) if isinstance(v, _Symbol) else v) for k, v in variables.items()},
        assignment=dict(bound),
        choices=tuple(scope.defs.values()),
        span=mdl.span,
        default_norm=default_norm,
    )


def _too_many_params(n: int, span: ir.Span, where: str) -> None:
    raise BlockError(
        f"the model has more than 10**15 parameters (about {n:.1e} with {where})",
        span,
        "a size is probably a typo: the largest models trained so far have ~2e12",
    )


def _sig_text(sig: tuple) -> str:
    prim, args = sig
    return f"{prim}(" + ", ".join(f"{k}={v}" for k, v in args) + ")"
