"""Located errors: the error message is part of the language.

Every problem in a spec is raised as `BlockError` with the span of the offending text
and, where we can guess it, a hint. `format()` renders `file:line:col`, the source line
and a caret under the offending text; the CLI prints that and exits non-zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blockdsl.ir import Span

# Source texts by file name, so an error raised far from the parser can still show
# the line it points at (strings parsed from Python are registered under "<text>").
_SOURCES: dict[str, str] = {}
_MAX_SHOWN = 120  # characters of a source line shown under an error


def register_source(file: str, text: str) -> None:
    _SOURCES[file] = text


def source_line(file: str, line: int) -> str | None:
    text = _SOURCES.get(file)
    if text is None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError:
            return None
    lines = text.splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else None


class BlockError(Exception):
    """A problem in a .block spec, located at `span`."""

    def __init__(self, message: str, span: Span | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint

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
    close = difflib.get_close_matches(word, known, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    return "expected one of: " + ", ".join(known) if known else "nothing is defined here"
