"""A shell line read as bash reads it, as far as the docs tests need: simple commands joined by `&&`,
`||`, `;`, `|`, `|&` or `&`, subshells `( ... )`, and each command's redirections. Quotes, `$(...)`
and backquotes are kept whole. Pure text: `render(parse(line))` is the line with its spacing
normalised, and a command's words can be replaced without touching the rest."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

OPERATORS = ("&&", "||", "|&", ";", "|", "&")
# A redirection's operator, at the start of a word: `>`, `>>`, `2>`, `2>&1`, `&>`, `<`, `<<<` ...
REDIRECT = re.compile(r"(\d*(>>|>&|>\||>|<<<|<<|<&|<>|<)|&>>|&>)")


@dataclass(frozen=True)
class Simple:
    words: str  # the command and its arguments, as written
    redirects: str = ""  # its redirections, as written


@dataclass(frozen=True)
class Subshell:
    body: tuple[Item, ...]
    redirects: str = ""


@dataclass(frozen=True)
class Item:
    node: Simple | Subshell
    op: str = ""  # the operator after it ("" for the last)


class ShellSyntaxError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    """("word" | "redirect" | "op", raw text) in order; a redirection's raw text includes its target."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        op = next((o for o in ("(", ")", *OPERATORS) if text.startswith(o, i)), None)
        if op and not text.startswith(("&>",), i):
            out.append(("op", op))
            i += len(op)
            continue
        m = REDIRECT.match(text, i)
        if m:
            j = m.end()
            if not m.group(0).endswith("&") or not text[j : j + 1].isdigit() and text[j : j + 1] != "-":
                while j < n and text[j].isspace():
                    j += 1
            end = _word_end(text, j)
            if end == j:
                raise ShellSyntaxError(f"a redirection without a target in: {text}")
            out.append(("redirect", text[i:end]))
            i = end
            continue
        end = _word_end(text, i)
        out.append(("word", text[i:end]))
        i = end
    return out


def _word_end(text: str, i: int) -> int:
    """Where the word starting at i ends: at unquoted whitespace, an operator or a redirection."""
    n = len(text)
    while i < n:
        ch = text[i]
        if ch.isspace() or ch in "()|&;<>":
            return i
        if ch == "\\":
            i += 2
        elif ch == "'":
            i = _closing(text, i + 1, "'")
        elif ch == '"':
            i = _closing(text, i + 1, '"')
        elif ch == "`":
            i = _closing(text, i + 1, "`")
        elif text.startswith("$(", i):
            i = _substitution_end(text, i + 2)
        else:
            i += 1
    return min(i, n)


def _closing(text: str, i: int, quote: str) -> int:
    while i < len(text):
        if text[i] == "\\" and quote != "'":
            i += 2
            continue
        if text[i] == quote:
            return i + 1
        i += 1
    raise ShellSyntaxError(f"an unclosed {quote} in: {text}")


def _substitution_end(text: str, i: int) -> int:
    depth = 1
    while i < len(text):
        ch = text[i]
        if ch in "'\"`":
            i = _closing(text, i + 1, ch)
            continue
        depth += {"(": 1, ")": -1}.get(ch, 0)
        i += 1
        if depth == 0:
            return i
    raise ShellSyntaxError(f"an unclosed $( in: {text}")


def parse(text: str) -> tuple[Item, ...]:
    tokens = _tokens(text)
    items, i = _sequence(tokens, 0, text)
    if i != len(tokens):
        raise ShellSyntaxError(f"an unmatched ) in: {text}")
    return items


def _sequence(tokens: list[tuple[str, str]], i: int, text: str) -> tuple[tuple[Item, ...], int]:
    items: list[Item] = []
    while i < len(tokens) and tokens[i] != ("op", ")"):
        node: Simple | Subshell
        if tokens[i] == ("op", "("):
            body, i = _sequence(tokens, i + 1, text)
            if i >= len(tokens):
                raise ShellSyntaxError(f"an unclosed ( in: {text}")
            i += 1
            redirects = []
            while i < len(tokens) and tokens[i][0] == "redirect":
                redirects.append(tokens[i][1])
                i += 1
            node = Subshell(body, " ".join(redirects))
        else:
            words, redirects = [], []
            while i < len(tokens) and tokens[i][0] != "op":
                (words if tokens[i][0] == "word" else redirects).append(tokens[i][1])
                i += 1
            if not words and not redirects:
                raise ShellSyntaxError(f"an operator without a command before it in: {text}")
            node = Simple(" ".join(words), " ".join(redirects))
        op = ""
        if i < len(tokens) and tokens[i][0] == "op" and tokens[i][1] in OPERATORS:
            op = tokens[i][1]
            i += 1
        items.append(Item(node, op))
    return tuple(items), i


def render(items: tuple[Item, ...]) -> str:
    out = []
    for item in items:
        node = item.node
        if isinstance(node, Simple):
            text = node.words
        else:
            text = f"({render(node.body)})"
        if node.redirects:
            text += " " + node.redirects
        out.append(text + ({";": ";", "": ""}.get(item.op, " " + item.op)))
    return " ".join(out).strip()


def simple_commands(items: tuple[Item, ...]) -> Iterator[Simple]:
    """Every simple command, in the order they appear, subshells included."""
    for item in items:
        if isinstance(item.node, Subshell):
            yield from simple_commands(item.node.body)
        else:
            yield item.node


def rewrite(items: tuple[Item, ...], f: Callable[[Simple], Simple]) -> tuple[Item, ...]:
    """The same line with every simple command replaced by f(command)."""
    out = []
    for item in items:
        node = item.node
        if isinstance(node, Subshell):
            out.append(replace(item, node=replace(node, body=rewrite(node.body, f))))
        else:
            out.append(replace(item, node=f(node)))
    return tuple(out)
