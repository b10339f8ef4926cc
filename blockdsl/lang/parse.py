"""Text to IR: the lark grammar, a Transformer that builds IR nodes, and includes."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError

from blockdsl.files import NotARegularFile, TooLarge, read_regular
from blockdsl.lang import ir
from blockdsl.lang.errors import MAX_SPEC_BYTES, BlockError, bounded, brief, quotable, register_source

_GRAMMAR = Path(__file__).with_name("grammar.lark")

# Input limits: every spec file (and spec text) is at most 1 MiB; one load reads at most
# 256 files, 8 MiB in all, nested at most 64 includes deep. Real specs are a few KiB, so
# these only stop hostile or mistaken input (a device, a log file) before it costs memory.
MAX_FILE_BYTES = MAX_SPEC_BYTES
MAX_TOTAL_BYTES = 8 << 20
MAX_FILES = 256
MAX_INCLUDE_DEPTH = 64
# A number literal longer than this is a mistake (2**62 has 19 digits); checked on the
# token's text, before Python's int() (which refuses over 4300 digits, and is quadratic).
_MAX_LITERAL = 100

# Friendlier names for lark's terminal names in "expected ..." hints.
_TOKEN_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a quoted string",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "EQUAL": "'='",
    "COMMA": "','",
    "COLON": "':'",
    "VBAR": "'|'",
    "DOT": "'.'",
    "$END": "end of file",
}


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(
        _GRAMMAR.read_text(encoding="utf-8"),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=False,
        cache=True,  # LALR tables cached on disk: keeps `blockdsl check` instant
    )


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
class _Build(Transformer):
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


def _expected_hint(err: UnexpectedInput) -> str | None:
    expected = getattr(err, "expected", None) or getattr(err, "allowed", None)
    if not expected:
        return None
    names = sorted({_TOKEN_NAMES.get(t, t.lower().strip('"') if t.isupper() else t) for t in expected})
    names = [n if n.startswith(("'", "a ", "end")) else f"'{n}'" for n in names]
    if len(names) > 8:
        names = names[:8] + ["..."]
    return "expected " + ", ".join(names)


def parse_text(text: str, file: str = "<text>") -> list[Any]:
    """Parse one file's text into a list of top-level IR items (includes unresolved)."""
    if len(text) > MAX_FILE_BYTES:
        raise BlockError(
            f"{file} is {len(text):,} characters, more than the 1 MiB a spec may be",
            None,
            "a spec is a few KiB of text: is this the right file?",
        )
    register_source(file, text)
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as err:
        line, col = err.line if err.line > 0 else 1, err.column if err.column > 0 else 1
        if isinstance(err, UnexpectedCharacters):
            ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else ""
            msg = f"unexpected character {ch!r}"
            width = 1
        elif isinstance(err, UnexpectedEOF):
            lines = text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
            msg, width = "unexpected end of file", 1
        else:
            tok = getattr(err, "token", None)
            shown = str(tok) if tok is not None and str(tok) else "end of file"
            msg, width = f"unexpected {brief(shown, 30)!r}", max(1, len(str(tok or " ")))
            if tok is not None and tok.type == "$END":
                lines = text.splitlines() or [""]
                line, col = len(lines), len(lines[-1]) + 1
                msg = "unexpected end of file (an unclosed '{' or '('?)"
        span = ir.Span.model_construct(file=file, line=line, col=col, end_line=line, end_col=col + width)
        if not quotable(file):  # not a spec file: say where, never what it contains
            raise BlockError(
                "this is not .block text", span, "spec files are named NAME.block; is this the right file?"
            ) from None
        raise BlockError(msg, span, _expected_hint(err)) from None
    try:
        return _Build(file).transform(tree)
    except VisitError as err:
        if isinstance(err.orig_exc, BlockError):
            raise err.orig_exc from None
        if isinstance(err.orig_exc, RecursionError):
            raise _too_deep(file) from None
        raise
    except RecursionError:
        raise _too_deep(file) from None


def _too_deep(file: str) -> BlockError:
    return BlockError(
        "expression nested too deeply",
        ir.Span.model_construct(file=file, line=1, col=1, end_line=1, end_col=2),
        "simplify the expression",
    )


def read_spec_file(path: Path, include: ir.Include | None) -> str:
    """A spec file's text, or a located error saying why it cannot be read.

    Only a regular file is read, and at most 1 MiB of it (`files.read_regular`: a FIFO, a
    device like /dev/zero or a folder is refused before one byte is read). Error messages
    name the file but never quote its bytes.
    """
    span = include.span if include else None
    try:
        data = read_regular(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise BlockError(f"no such file: {path}", span, "check the path") from None
    except IsADirectoryError:
        raise _folder(path, span) from None
    except NotARegularFile:
        raise BlockError(f"{path} is not a regular file (a device, pipe or socket)", span,
                         "a spec is a .block text file") from None
    except TooLarge as err:
        raise _too_big(path, err.size, span) from None
    except (OSError, ValueError) as err:
        raise BlockError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}", span) from None
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is no part of the text
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BlockError(
            f"{path} is not UTF-8 text (byte {err.start})", span, "is this really a .block file?"
        ) from None


def _too_big(path: Path, size: int, span: ir.Span | None) -> BlockError:
    return BlockError(
        f"{path} is more than the 1 MiB a spec file may be ({size:,} bytes or more)",
        span,
        "a spec is a few KiB of text: is this the right file?",
    )


def _folder(path: Path, span: ir.Span | None) -> BlockError:
    return BlockError(f"{path} is a folder, not a .block file", span, "name a .block file inside it")


class _Load:
    """One `load_module` call: the files read so far, so each is parsed once.

    A file is identified by (device, inode), so two spellings of one path, or a symlink,
    are one file. A file included a second time (a diamond: a and b both include common)
    contributes nothing the second time, like a header guard; so does a fan-out of
    files including each other many times, which would otherwise be exponential.
    """

    def __init__(self) -> None:
        self.done: set[tuple[int, int]] = set()
        self.bytes = 0
        self.items: dict[str, list] = {k: [] for k in ("assigns", "blocks", "models", "includes")}

    def file(self, file: str, text: str, base: Path, stack: tuple) -> list[str]:
        """Add one file's items (its includes first, where they stand); return its own model names."""
        own: list[str] = []
        for item in parse_text(text, file):
            if isinstance(item, ir.Include):
                self.include(item, base, stack)
            elif isinstance(item, ir.Assign):
                self.items["assigns"].append(item)
            elif isinstance(item, ir.Block):
                self.items["blocks"].append(item)
            elif isinstance(item, ir.Model):
                self.items["models"].append(item)
                own.append(item.name)
        return own

    def include(self, item: ir.Include, base: Path, stack: tuple) -> None:
        written = item.path

        def fail(message: str) -> BlockError:
            return BlockError(
                message,
                item.span,
                f"paths are relative to the including file's folder ({_shown_dir(base)}) "
                "and name a .block file",
            )

        if not written:
            raise fail("an include needs a file name")
        if "\x00" in written:
            raise fail("bad include path: it contains a NUL character")
        if Path(written).is_absolute() or written.startswith("~"):
            raise BlockError(
                f"include paths must be relative: {brief(written, 40)}",
                item.span,
                "paths are relative to the including file's folder (.. may climb out of it), "
                "so a spec and its includes move together",
            )
        if Path(written).suffix != ".block":
            raise fail(f"an include must name a .block file: {brief(written, 40)}")
        try:
            target = (base / written).resolve()
            exists = target.exists()
        except (ValueError, OSError, RuntimeError) as err:
            raise fail(f"bad include path: {brief(err, 40)}") from None
        if not exists:
            raise fail(f"included file not found: {brief(written, 40)}")
        if target.suffix != ".block":  # a link from x.block to some other file
            raise fail(f"{brief(written, 40)} links to a file not named .block")
        try:
            st = os.stat(target)
        except OSError as err:
            raise BlockError(f"cannot read {target}: {err.strerror}", item.span) from None
        key = (st.st_dev, st.st_ino)
        if key in (k for k, _ in stack):
            chain = " -> ".join(Path(p).name for p in [name for _, name in stack] + [str(target)])
            raise BlockError(
                f"include cycle: {chain}", item.span, "a file may not include itself, even indirectly"
            )
        if key in self.done:
            return
        if len(stack) >= MAX_INCLUDE_DEPTH:
            raise BlockError(
                f"includes nested more than {MAX_INCLUDE_DEPTH} deep", item.span, "flatten the include chain"
            )
        if len(self.done) >= MAX_FILES:
            raise BlockError(f"more than {MAX_FILES} files included", item.span, "merge some of them")
        text = read_spec_file(target, item)
        self.bytes += len(text)
        if self.bytes > MAX_TOTAL_BYTES:
            raise BlockError(
                "the included files add up to more than 8 MiB", item.span, "a spec is a few KiB of text"
            )
        self.done.add(key)
        self.items["includes"].append(item)
        self.file(str(target), text, target.parent, stack + ((key, str(target)),))


def load_module(source: str | Path) -> ir.Module:
    """Parse a file (or text) and everything it includes into one flat `Module`.

    `source` is a path, or .block text when it contains a newline or a '{'.
    Include rules (README, "Includes"): a path is relative to the including file's folder
    (`..` may leave it; an absolute path is an error, so a spec tree moves as a whole); it
    must name a regular `.block` file of at most 1 MiB; a file already included in this
    load is skipped; a cycle or a missing file is a located error at the include line.
    """
    is_text = not isinstance(source, Path) and (
        "\n" in source or "{" in source or ("=" in source and not _exists(source))
    )
    load = _Load()
    stack: tuple = ()
    if not is_text:
        path = Path(source)
        text = read_spec_file(path, None)
        file, base = str(path), path.parent
        try:
            st = os.stat(path)
            stack = (((st.st_dev, st.st_ino), str(path.resolve())),)
            load.done.add(stack[0][0])
        except (OSError, RuntimeError):
            pass
    else:
        file, text, base = "<text>", str(source), Path.cwd()
    own = load.file(file, text, base, stack)
    return ir.Module.model_construct(
        file=file,
        assigns=tuple(load.items["assigns"]),
        blocks=tuple(load.items["blocks"]),
        models=tuple(load.items["models"]),
        includes=tuple(load.items["includes"]),
        own_models=tuple(own),
    )


def _shown_dir(base: Path) -> str:
    try:
        return str(base.resolve())
    except (OSError, RuntimeError):
        return str(base)


def _exists(source: str) -> bool:
    try:
        return Path(source).exists()
    except (OSError, ValueError):
        return False
