"""Lark's parse tree -> IR nodes: one Transformer method per grammar rule.

Kept apart from `parse` (the grammar, syntax errors and file loading) because it is the
one place that knows the IR's constructors: a rule added to the grammar gets its method
here. Nodes are built with `model_construct` (no validation): the parser already
guarantees their shape, and building pydantic schemas would cost `blockdsl check` its
start-up time (tests/test_startup.py). Torch-free.
"""

from __future__ import annotations

from typing import Any

from lark import Token, Transformer, v_args

from blockdsl.lang import ir
from blockdsl.lang.errors import BlockError, bounded, brief

# A number literal longer than this is a mistake (2**62 has 19 digits); checked on the
# token's text, before Python's int() (which refuses over 4300 digits, and is quadratic).
_MAX_LITERAL = 100


def _span(file: str, meta: Any) -> ir.Span:
    return ir.Span.model_construct(
        file=file,
        line=getattr(meta, "line", 1) or 1,
        col=getattr(meta, "column", 1) or 1,
        end_line=getattr(meta, "end_line", 1) or 1,
        end_col=getattr(meta, "end_column", 1) or 1,
    )


def _tok_span(file: str, tok: Token) -> ir.Span:
    return ir.Span.model_construct(
        file=file,
        line=tok.line or 1,
        col=tok.column or 1,
        end_line=tok.end_line or tok.line or 1,
        end_col=tok.end_column or (tok.column or 1) + len(tok),
    )


def _number(text: str, span: ir.Span) -> int | float:
    text = text.replace("_", "")
    is_int = not any(c in text for c in ".eE")
    if (is_int and len(text.lstrip("0")) > 19) or len(text) > _MAX_LITERAL:
        raise BlockError(
            f"number too large: {brief(text)}" if is_int else f"number literal too long: {brief(text)}",
            span,
            "integers are capped at 2**62 (about 4.6e18); write large floats as 1e30",
        )
    if not is_int:
        value = float(text)
        # 1e6 is an integer count in this language; keep it an int when exact.
        exact = value.is_integer() and abs(value) <= 2**53
        if ("e" in text or "E" in text) and "." not in text and exact:
            return int(value)
        return value
    return int(text)


@v_args(meta=True)
class IRBuilder(Transformer):
    """Tree -> IR nodes. Positions come from `meta` (propagate_positions)."""

    def __init__(self, file: str):
        super().__init__(visit_tokens=False)
        self.file = file

    def sp(self, meta: Any) -> ir.Span:
        return _span(self.file, meta)

    # ------------------------------------------------------------ expressions
    def number(self, meta, c):
        span = self.sp(meta)
        value = bounded(_number(str(c[0]), span), span)
        return ir.Num.model_construct(value=value, span=span)

    def string(self, meta, c):
        return ir.Str.model_construct(value=str(c[0])[1:-1], span=self.sp(meta))

    def true(self, meta, c):
        return ir.Bool.model_construct(value=True, span=self.sp(meta))

    def false(self, meta, c):
        return ir.Bool.model_construct(value=False, span=self.sp(meta))

    def name(self, meta, c):
        return ir.Name.model_construct(id=str(c[0]), span=self.sp(meta))

    def func(self, meta, c):
        return ir.Func.model_construct(name=str(c[0]), args=tuple(c[1:]), span=self.sp(meta))

    def neg(self, meta, c):
        return ir.Neg.model_construct(operand=c[0], span=self.sp(meta))

    def _bin(op: str):  # noqa: N805 - a factory evaluated in the class body
        def f(self, meta, c):
            return ir.BinOp.model_construct(op=op, left=c[0], right=c[1], span=self.sp(meta))

        return f

    add, sub, mul, div = _bin("+"), _bin("-"), _bin("*"), _bin("/")
    floordiv, mod, pow = _bin("//"), _bin("%"), _bin("**")

    def option_value(self, meta, c):
        return ir.ChoiceOption.model_construct(value=c[0], span=self.sp(meta))

    def option_range(self, meta, c):
        log = any(isinstance(x, Token) and x.type == "LOG" for x in c)
        exprs = [x for x in c if not isinstance(x, Token)]
        step = exprs[2] if len(exprs) > 2 else None
        return ir.ChoiceOption.model_construct(
            lo=exprs[0], hi=exprs[1], step=step, log=log, span=self.sp(meta)
        )

    def choice(self, meta, c):
        return ir.Choice.model_construct(options=tuple(c), span=self.sp(meta))

    # ------------------------------------------------------------ calls
    def arg(self, meta, c):
        return ir.Arg.model_construct(name=str(c[0]), value=c[1], span=self.sp(meta))

    def call(self, meta, c):
        return ir.Call.model_construct(name=str(c[0]), args=tuple(c[1:]), span=self.sp(meta))

    def call_choice(self, meta, c):
        return ("choice", tuple(c), self.sp(meta))

    def assign(self, meta, c):
        return ir.Assign.model_construct(name=str(c[0]), value=c[1], span=self.sp(meta))

    # ------------------------------------------------------------ blocks
    def norm_opt(self, meta, c):
        return (
            "norm",
            ir.NormOpt.model_construct(
                placement=str(c[0]), kind=str(c[1]) if len(c) > 1 else None, span=self.sp(meta)
            ),
        )

    def share_opt(self, meta, c):
        return ("share", str(c[0]))

    def norm_share_opt(self, meta, c):
        return ("norm_share", str(c[0]))

    def _options(self, opts: list, meta: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in opts:
            if key in out:
                raise BlockError(
                    f"option '{key}' is given twice",
                    self.sp(meta),
                    "give each of norm=, share=, norm_share= at most once per line",
                )
            out[key] = value
        return out

    def sublayer(self, meta, c):
        label = str(c[0])
        prim = c[1]
        opts = self._options(c[2:], meta)
        if isinstance(prim, tuple):  # a choice between calls
            _, calls, cspan = prim
            return ir.Sublayer.model_construct(
                label=label, prims=calls, span=self.sp(meta), choice_span=cspan, **opts
            )
        return ir.Sublayer.model_construct(label=label, prims=(prim,), span=self.sp(meta), **opts)

    def slots(self, meta, c):
        _, calls, _cspan = c[1]
        opts = self._options(c[2:], meta)
        return ir.Slots.model_construct(count=c[0], prims=calls, span=self.sp(meta), **opts)

    def block(self, meta, c):
        return ir.Block.model_construct(name=str(c[0]), items=tuple(c[1:]), span=self.sp(meta))

    # ------------------------------------------------------------ layout
    def index(self, meta, c):
        return ir.Index.model_construct(
            start=c[0],
            stop=c[1] if len(c) > 1 else None,
            step=c[2] if len(c) > 2 else None,
            span=self.sp(meta),
        )

    def override(self, meta, c):
        indices = [x for x in c if isinstance(x, ir.Index)]
        rest = [x for x in c if not isinstance(x, ir.Index)]
        target = str(rest[0])
        field = str(rest[1]) if len(rest) == 3 else None
        return ir.Override.model_construct(
            indices=tuple(indices), target=target, field=field, value=rest[-1], span=self.sp(meta)
        )

    def overrides(self, meta, c):
        return ("overrides", tuple(c))

    def groups_opt(self, meta, c):
        return ("groups", c[0])

    def order_opt(self, meta, c):
        return ("order", str(c[0]))

    def repeat(self, meta, c):
        kw: dict[str, Any] = {}
        for item in c[2:]:
            key, value = item
            if key in kw:
                raise BlockError(f"'{key}' is given twice", self.sp(meta))
            kw[key] = value
        return ir.Repeat.model_construct(
            count=c[0], block=str(c[1]), block_span=_tok_span(self.file, c[1]), span=self.sp(meta), **kw
        )

    def letter_def(self, meta, c):
        return ir.LetterDef.model_construct(letter=str(c[0]), call=c[1], span=self.sp(meta))

    def pattern(self, meta, c):
        letters = tuple(x for x in c[1:] if isinstance(x, ir.LetterDef))
        opts = self._options([x for x in c[1:] if isinstance(x, tuple)], meta)
        return ir.Pattern.model_construct(text=str(c[0])[1:-1], letters=letters, span=self.sp(meta), **opts)

    # ------------------------------------------------------------ model items
    def _kw(key: str):  # noqa: N805
        def f(self, meta, c):
            return (key, c[0], self.sp(meta))

        return f

    stem, head, norm_default, final_norm, altup, budget = (
        _kw("stem"),
        _kw("head"),
        _kw("norm"),
        _kw("final_norm"),
        _kw("altup"),
        _kw("budget"),
    )

    def baseline(self, meta, c):
        return ("baseline", str(c[0]), self.sp(meta))

    def _metric(self, tok: Token, what: str) -> str:
        name = str(tok)
        if name not in ir.METRICS:
            from blockdsl.lang.errors import did_you_mean  # the error path only

            raise BlockError(f"unknown {what} metric '{brief(name, 30)}'", _tok_span(self.file, tok),
                             did_you_mean(name, ir.METRICS))
        return name

    def minimize(self, meta, c):
        metric = self._metric(c[0], "objective")
        return ir.Objective.model_construct(direction="minimize", metric=metric, span=self.sp(meta))

    def maximize(self, meta, c):
        metric = self._metric(c[0], "objective")
        return ir.Objective.model_construct(direction="maximize", metric=metric, span=self.sp(meta))

    def constraint(self, meta, c):
        metric = self._metric(c[0], "constraint")
        return ir.Constraint.model_construct(metric=metric, op=str(c[1]), bound=c[2], span=self.sp(meta))

    def extends(self, meta, c):
        return ("extends", str(c[0]), self.sp(meta))

    def _model(self, meta, c, is_space: bool):
        name = str(c[0])
        fields: dict[str, Any] = {
            "assigns": [],
            "blocks": [],
            "layout": [],
            "objectives": [],
            "constraints": [],
        }
        for item in c[1:]:
            if isinstance(item, ir.Assign):
                fields["assigns"].append(item)
            elif isinstance(item, ir.Block):
                fields["blocks"].append(item)
            elif isinstance(item, (ir.Repeat, ir.Pattern)):
                fields["layout"].append(item)
            elif isinstance(item, ir.Objective):
                fields["objectives"].append(item)
            elif isinstance(item, ir.Constraint):
                fields["constraints"].append(item)
            else:
                key, value, span = item
                if key in fields:
                    raise BlockError(
                        f"'{key}' is given twice in {'space' if is_space else 'model'} '{name}'",
                        span,
                        "keep one; a derived model overrides with `extends`",
                    )
                fields[key] = value
        for key in ("assigns", "blocks", "layout", "objectives", "constraints"):
            fields[key] = tuple(fields[key])
        return ir.Model.model_construct(name=name, is_space=is_space, span=self.sp(meta), **fields)

    def model(self, meta, c):
        return self._model(meta, c, False)

    def space(self, meta, c):
        return self._model(meta, c, True)

    def include(self, meta, c):
        return ir.Include.model_construct(path=str(c[0])[1:-1], span=self.sp(meta))

    def start(self, meta, c):
        return list(c)
