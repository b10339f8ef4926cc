"""The language's one expression evaluator, and search choices as the sampler sees them.

Everything that gives a `.block` expression a value goes through `Scope`: the resolver
(variables, arguments, repeat counts, choices), the search's training variables
(`lr = {1e-4 .. 1e-2 log}`) and its constraint bounds (`eval_expr`). One evaluator means
one set of rules: the same number bounds, the same range checks on a choice, the same
located errors, wherever an expression is written. Torch-free.

Public API: `Scope`, `eval_expr`, `depends_on_choice`, `choice_def`, `ChoiceDef`,
`Chooser`, `first_option`, `Symbol`, `Unbound`, `MAX_VAR_DEPTH`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError, bounded, brief, did_you_mean
from blockdsl.plan import ChoiceDef

__all__ = [
    "MAX_VAR_DEPTH",
    "ChoiceDef",
    "Chooser",
    "Scope",
    "Symbol",
    "Unbound",
    "choice_def",
    "depends_on_choice",
    "eval_expr",
    "first_option",
]


Chooser = Callable[[ChoiceDef], Any]


def first_option(c: ChoiceDef) -> Any:
    """The default binding of an unbound choice: its first option (or a range's low end)."""
    return c.values[0] if c.kind == "categorical" else (int(c.lo) if c.kind == "int" else c.lo)


# ---------------------------------------------------------------- what an expression reads


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


# ---------------------------------------------------------------- arithmetic

_FUNCS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "int": int,
    "round": round,
    "ceil": math.ceil,
    "floor": math.floor,
    "sqrt": math.sqrt,
}

_MAX_ROUND_DIGITS = 400  # round(x, n): int rounding builds 10**|n|

# How deep variables may refer to variables that refer to variables (real specs: a few).
MAX_VAR_DEPTH = 100


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


def _binop(e: ir.BinOp, left: Any, right: Any) -> Any:
    """`left OP right` for two checked numbers; overflow and division by zero located."""
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


# ---------------------------------------------------------------- choices


class Unbound(Exception):
    """Raised while checking unused variables when one would bind a new search choice."""


class Symbol(str):
    """A bare name that is not a variable (`act=gelu`); remembers where it was."""

    span: ir.Span


def choice_def(
    c: ir.Choice, name: str, evaluate: Callable[[Any], Any], assigns: dict[str, ir.Assign]
) -> ChoiceDef:
    """The sampler's view of choice `c` named `name`, its options evaluated by `evaluate`.

    Refuses what no sampler can draw from: a choice nested in an option, an empty range, a
    log range through zero, a range mixed with options, an option listed twice. A whole
    integer range on a log scale drops its step (a log scale has no even steps).
    """
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
        lo, hi = evaluate(o.lo), evaluate(o.hi)
        step = evaluate(o.step) if o.step is not None else None
        is_int = all(isinstance(v, int) for v in (lo, hi) + ((step,) if step else ()))
        if lo > hi:
            raise BlockError(f"empty range: {lo} .. {hi}", o.span, "write the low end first")
        if o.log and lo <= 0:
            raise BlockError("a log range needs a positive low end", o.span)
        if is_int and o.log:
            return ChoiceDef(name, "int", (), lo, hi, None, True, c.span)
        return ChoiceDef(name, "int" if is_int else "float", (), lo, hi, step, o.log, c.span)
    values = []
    for o in opts:
        if o.value is None:
            raise BlockError(
                "a range cannot be mixed with other options in one choice",
                o.span,
                "write either {a | b | c} or {lo .. hi step s}",
            )
        values.append(evaluate(o.value))
    if len(set(map(repr, values))) != len(values):
        raise BlockError("a choice lists the same option twice", c.span)
    dynamic = any(depends_on_choice(o.value, assigns) for o in opts)
    return ChoiceDef(name, "categorical", tuple(values), span=c.span, dynamic=dynamic)


# ---------------------------------------------------------------- the evaluator


class Scope:
    """Variables of one model (or space), evaluated lazily and at most once each.

    Lazily, so that a derived model's overrides reach everything computed from them and a
    variable nobody reads binds no choice. `bound` maps choice names to values: a choice
    met again (by name) takes the value it took first, and a choice not yet bound is put
    to `chooser`, its definition kept in `defs` (in the order met: the sampler's order).
    """

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

    def settled(self) -> dict[str, Any]:
        """Every variable that has a value without binding a new choice, bare names as str.

        What a Plan reports as its variables: a variable no layer read is still shown
        when it is a plain value, but one that would sample a choice stays out (asking the
        sampler for it would add a parameter the model never uses).
        """
        out: dict[str, Any] = {}
        self.probing = True  # a variable that would bind a new choice stays unevaluated
        try:
            for name, a in self.assigns.items():
                try:
                    out[name] = self.var(name, a.span)
                except Unbound:
                    continue
        finally:
            self.probing = False
        return {k: (str(v) if isinstance(v, Symbol) else v) for k, v in out.items()}

    def choice(self, c: ir.Choice, name: str) -> Any:
        if name in self.bound:
            return self.bound[name]
        if self.probing:
            raise Unbound(name)
        cdef = choice_def(c, name, lambda e: self.eval(e, name), self.assigns)
        self.defs[name] = cdef
        value = self.chooser(cdef)
        self.bound[name] = value
        return value

    def eval(self, e: ir.Expr | ir.Call, ctx_name: str) -> Any:
        """The value of `e`; `ctx_name` names a choice written inline in it."""
        if isinstance(e, ir.Num):
            return _bounded(e.value, e)
        if isinstance(e, (ir.Str, ir.Bool)):
            return e.value
        if isinstance(e, ir.Name):
            if e.id in self.assigns:
                return self.var(e.id, e.span)
            sym = Symbol(e.id)
            sym.span = e.span
            return sym
        if isinstance(e, ir.Neg):
            v = self.eval(e.operand, ctx_name)
            self.number(v, e.operand)
            return _bounded(-v, e)
        if isinstance(e, ir.BinOp):
            left, right = self.eval(e.left, ctx_name), self.eval(e.right, ctx_name)
            self.number(left, e.left)
            self.number(right, e.right)
            return _binop(e, left, right)
        if isinstance(e, ir.Func):
            return self._func(e, ctx_name)
        if isinstance(e, ir.Choice):
            return self.choice(e, ctx_name)
        if isinstance(e, ir.Call):
            return e  # nested calls are interpreted by their consumer
        raise BlockError(f"cannot evaluate {type(e).__name__}", getattr(e, "span", None))

    def _func(self, e: ir.Func, ctx_name: str) -> Any:
        fn = _FUNCS.get(e.name)
        if fn is None:
            raise BlockError(f"unknown function '{e.name}'", e.span, did_you_mean(e.name, _FUNCS))
        args = [self.eval(a, ctx_name) for a in e.args]
        for a, node in zip(args, e.args):
            self.number(a, node)
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

    def integer(
        self, e: ir.Expr, what: str, lo: int = 1, hi: int | None = None, name: str | None = None
    ) -> int:
        """Evaluate `e` as an integer in [lo, hi], or raise a located error saying why not.

        `name` names an inline search choice in `e` (e.g. `cell.slots`)."""
        v = self.eval(e, name or what)
        self.number(v, e)
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

    def number(self, v: Any, node: Any) -> None:
        """Refuse `v` (the value of `node`) unless it is a number, naming an unknown name."""
        if isinstance(v, Symbol):
            raise BlockError(f"unknown variable '{v}'", node.span, did_you_mean(str(v), self.assigns))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BlockError(f"expected a number, got {v!r}", node.span)


def eval_expr(e: ir.Expr, variables: dict[str, Any]) -> Any:
    """Evaluate an expression with numeric `variables` bound (e.g. `1.0 * baseline`)."""
    assigns = {
        k: ir.Assign.model_construct(name=k, value=ir.Num.model_construct(value=v, span=e.span), span=e.span)
        for k, v in variables.items()
    }
    return Scope(assigns, first_option, {}).eval(e, "")
