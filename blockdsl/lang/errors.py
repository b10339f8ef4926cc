"""Located errors: the error message is part of the language.

Every problem in a spec is raised as `BlockError` with the span of the offending text
and, where we can guess it, a hint. `format()` renders `file:line:col`, the source line
and a caret under the offending text; the CLI prints that and exits non-zero.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockdsl.lang.ir import Span

# Source texts by file name, so an error raised far from the parser can still show
# the line it points at (strings parsed from Python are registered under "<text>").
# None marks a file whose lines must never be shown (see `quotable`).
_SOURCES: dict[str, str | None] = {}
_MAX_SHOWN = 120  # characters of a source line shown under an error
_MAX_MESSAGE = 500  # characters of a message or hint: user text inside one can be 1 MB long

# The language's number bounds, checked on every literal and every computed value.
# 2**62 is far past any real size and keeps a typo like 10**100 (or 10**10**10) from
# building a bignum; floats must stay finite.
MAX_INT = 2**62
# A spec file (and spec text) is at most 1 MiB: real specs are a few KiB.
MAX_SPEC_BYTES = 1 << 20


def quotable(file: str) -> bool:
    """May an error show lines of `file`? Only spec text: Python strings and `.block` files.

    A command line may name any file (`blockdsl check /etc/passwd`), and an error in it
    must not print what the user never wrote as a spec; includes must be `.block` files.
    """
    if file == "<text>":
        return True
    # A link named x.block to another file is judged by the file it reaches.
    return Path(file).suffix == ".block" and os.path.realpath(file).endswith(".block")


def register_source(file: str, text: str) -> None:
    _SOURCES[file] = text if quotable(file) else None


def source_line(file: str, line: int) -> str | None:
    if file in _SOURCES:
        text = _SOURCES[file]
    elif quotable(file) and file != "<text>":
        # A span from another process (e.g. a search worker): read the file again, with
        # the same limits as the parser (a regular file, at most 1 MiB).
        from blockdsl.files import read_regular  # the error path only

        try:
            text = read_regular(Path(file), MAX_SPEC_BYTES).decode("utf-8-sig")
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return None
    else:
        return None
    if text is None:
        return None
    lines = text.splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else None


def brief(value: object, keep: int = 12) -> str:
    """A value's text for a message, shortened: `1234…5678 (4000 digits)`.

    Users can write very long numbers and names; a message quotes their ends and size.
    """
    text = str(value)
    if len(text) <= 2 * keep + 8:
        return text
    sign = "-" if text.startswith("-") else ""
    body = text[len(sign) :]
    unit = "digits" if body.isdigit() else "characters"
    return f"{sign}{body[:keep]}…{body[-keep:]} ({len(body)} {unit})"


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= _MAX_MESSAGE:
        return text
    half = _MAX_MESSAGE // 2
    return f"{text[:half]} … {text[-half // 2 :]}"


def bounded(v: object, span: Span | None) -> object:
    """`v` if the language can hold it (|int| <= 2**62, finite float), else a located error."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and abs(v) > MAX_INT:
        digits = int(v.bit_length() * 0.30103) + 1  # an estimate: never format a bignum
        raise BlockError(
            f"number too large: about 10**{digits - 1}",
            span,
            "integers are capped at 2**62 (about 4.6e18)",
        )
    if isinstance(v, float) and v != v:
        raise BlockError("the result is not a number (nan)", span)
    if isinstance(v, float) and v in (float("inf"), float("-inf")):
        raise BlockError("number too large", span, "floats stop near 1.8e308")
    if isinstance(v, complex):
        raise BlockError("the result is not a real number", span)
    return v


class BlockError(Exception):
    """A problem in a .block spec, located at `span`."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None):
        message = _clip(message) or ""
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = _clip(hint)

    def format(self) -> str:
        if self.span is None:
            head = f"error: {self.message}"
            return head + (f"\n  hint: {self.hint}" if self.hint else "")
        s = self.span
        out = [f"{s.file}:{s.line}:{s.col}: error: {self.message}"]
        text = source_line(s.file, s.line)
        if text is not None:
            text = text.replace("\t", " ")
            gutter = f"{s.line:>4} | "
            end = s.end_col if s.end_line == s.line and s.end_col > s.col else s.col + 1
            width = max(1, min(end, len(text) + 1) - s.col)
            col = s.col
            if len(text) > _MAX_SHOWN:  # show a window of a very long line around the column
                start = max(0, col - 1 - _MAX_SHOWN // 2)
                text = ("…" if start else "") + text[start : start + _MAX_SHOWN] + "…"
                col = col - start + (1 if start else 0)
            width = min(width, max(1, len(text) + 1 - col), 60)
            out.append(gutter + text)
            out.append(" " * (len(gutter) - 2) + "| " + " " * (col - 1) + "^" * width)
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """A hint naming the closest known words, or listing them all."""
    import difflib  # only on the error path: keeps it out of `blockdsl check`'s startup

    known = sorted(set(known))
    # Bounded work: a 1 MB name is no near miss of anything, and difflib is quadratic.
    close = difflib.get_close_matches(word, known, n=3, cutoff=0.6) if len(word) <= 100 else []
    if close:
        return "did you mean " + " or ".join(f"'{brief(c, 30)}'" for c in close) + "?"
    if not known:
        return "nothing is defined here"
    shown = [brief(k, 30) for k in known[:20]]
    more = f", ... ({len(known) - 20} more)" if len(known) > 20 else ""
    return "expected one of: " + ", ".join(shown) + more
