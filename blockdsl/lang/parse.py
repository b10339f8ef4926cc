"""Text to IR: the lark grammar, syntax errors located, and includes loaded.

The tree-to-IR Transformer is `blockdsl.lang.build.IRBuilder`."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError

from blockdsl.files import NotARegularFile, TooLarge, read_regular
from blockdsl.lang import ir
from blockdsl.lang.build import IRBuilder
from blockdsl.lang.errors import MAX_SPEC_BYTES, BlockError, brief, quotable, register_source

_GRAMMAR = Path(__file__).with_name("grammar.lark")

# Input limits: every spec file (and spec text) is at most 1 MiB; one load reads at most
# 256 files, 8 MiB in all, nested at most 64 includes deep. Real specs are a few KiB, so
# these only stop hostile or mistaken input (a device, a log file) before it costs memory.
MAX_FILE_BYTES = MAX_SPEC_BYTES
MAX_TOTAL_BYTES = 8 << 20
MAX_FILES = 256
MAX_INCLUDE_DEPTH = 64

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
        return IRBuilder(file).transform(tree)
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
