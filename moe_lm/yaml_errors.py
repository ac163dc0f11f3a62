"""PyYAML's syntax errors as one clause a user can act on: which line, and what was left open.

PyYAML reports an unclosed bracket or quote at the end of the file, past the last line; the
config loader's one-line error names where it was opened instead.
"""

from __future__ import annotations

import yaml

# What PyYAML says it was inside when it gave up -> what the user left open.
_OPENED = {"flow sequence": "'['", "flow mapping": "'{'", "quoted scalar": "quote"}


def _unclosed(text: str) -> tuple[str, int, int] | None:
    """The innermost '[' or '{' (or quote) still open at the end of `text`: (what, line, column), 1-based."""
    stack: list[tuple[str, int, int]] = []
    quote: tuple[str, int, int] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        for column, char in enumerate(line, 1):
            if quote is not None:
                if char == quote[0]:
                    quote = None
            elif char in "\"'" and line[: column - 1].rstrip()[-1:] in ("", ":", "[", "{", ",", "-"):
                quote = (char, number, column)  # a quote opens a scalar only where a value starts
            elif char == "#" and (column == 1 or line[column - 2] in " \t"):
                break
            elif char in "[{":
                stack.append((char, number, column))
            elif char in "]}" and stack:
                stack.pop()
    if quote is not None:
        return "quote", quote[1], quote[2]
    return (f"'{stack[-1][0]}'", stack[-1][1], stack[-1][2]) if stack else None


def yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """PyYAML's error as one clause naming the line: what is unclosed and where it opened, or what
    was found where (PyYAML's own marks point past the end of the file for an unclosed bracket)."""
    end = len(text.rstrip())
    problem, mark = getattr(e, "problem", None) or "", getattr(e, "problem_mark", None)
    context, opened_at = getattr(e, "context", None) or "", getattr(e, "context_mark", None)
    at_end = mark is None or mark.index >= end
    opener = next((what for kind, what in _OPENED.items() if kind in context), None)
    if opener and opened_at is not None and opened_at.index < end:
        unclosed: tuple[str, int, int] | None = (opener, opened_at.line + 1, opened_at.column + 1)
    else:
        unclosed = _unclosed(text) if at_end else None
    if unclosed is not None:
        what, line, column = unclosed
        where = f"line {line}, column {column}"
        found = (
            "the file ends"
            if at_end or mark is None
            else f"{problem.replace(', but', ' but')} at line {mark.line + 1}"
        )
        return f"the {what} at {where} is never closed ({found})"
    if mark is None:
        return str(e).splitlines()[0]
    where = "the end of the file" if at_end else f"line {mark.line + 1}, column {mark.column + 1}"
    return f"{problem} at {where}"
