"""Reading the docs as the tests need them: fenced blocks, the commands in shell blocks, links and
GitHub's heading anchors. Pure text handling; running the commands is `commands.py`'s job."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# A trailing comment holding this marks a line the tests only parse; the text after it says why.
NOT_RUN = re.compile(r"not run in tests:\s*(?P<why>.+?)\s*\)?\s*$")
# A `yaml` or `python` block whose first line is `# PATH` is a file the following commands use.
FILE_HEADER = re.compile(r"^#\s*(?P<path>[\w.\-/]+\.(?:ya?ml|py))\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")


def doc_files() -> list[Path]:
    """README.md and every guide in docs/, whoever wrote it."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    """A doc's name in messages: its path in the repository (a file elsewhere: its name)."""
    return str(path.relative_to(REPO)) if REPO in path.parents else path.name


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    lines: tuple[str, ...]  # the content, de-indented by the fence's indentation


@dataclass(frozen=True)
class Command:
    where: str  # "docs/data.md:12"
    text: str  # continuation lines joined, the trailing comment removed
    not_run: str | None  # why the line is only parsed, or None: it is run


@dataclass(frozen=True)
class FileBlock:
    where: str
    path: str  # relative to the directory the commands run in
    content: str


def blocks(path: Path) -> list[Block]:
    found: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m.group("indent")), i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        found.append(Block(path, start + 1, m.group("lang"), tuple(body)))
        i += 1
    return found


def split_comment(line: str) -> tuple[str, str]:
    """(the command, its trailing comment without '#'): a '#' starts a comment outside quotes, at
    the start of a word, as in the shell."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def commands_of(block: Block) -> list[Command]:
    """The commands of a shell block: every non-comment line (a `console` block's `$ ` lines only),
    continuation lines joined."""
    out: list[Command] = []
    pending: list[str] = []
    first = 0
    for n, raw in enumerate(block.lines):
        line = raw
        if block.lang == "console" and not pending:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending:
            first = n
        text, comment = split_comment(line)
        if text.endswith("\\"):
            pending.append(text[:-1].strip())
            continue
        pending.append(text.strip())
        m = NOT_RUN.search(comment)
        where = f"{rel(block.path)}:{block.line + 1 + first}"
        out.append(Command(where, " ".join(p for p in pending if p), m.group("why") if m else None))
        pending = []
    if pending:
        raise AssertionError(f"{rel(block.path)}:{block.line}: a shell block ends inside a continued line")
    return out


def file_block(block: Block) -> FileBlock | None:
    if block.lang not in ("yaml", "yml", "python") or not block.lines:
        return None
    m = FILE_HEADER.match(block.lines[0])
    if not m:
        return None
    return FileBlock(f"{rel(block.path)}:{block.line}", m.group("path"), "\n".join(block.lines) + "\n")


def steps(path: Path) -> list[Command | FileBlock]:
    """What a reader of `path` does, in order: files to write and commands to run."""
    out: list[Command | FileBlock] = []
    for block in blocks(path):
        if block.lang in SHELL_LANGS:
            out.extend(commands_of(block))
        elif (fb := file_block(block)) is not None:
            out.append(fb)
    return out


# ---------------------------------------------------------------------------------------------
# Links and anchors


LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Reference-style links: `[text][label]`, `[text][]` (the label is the text), and `[label]: target`.
REF_LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\[(?P<label>[^\]]*)\]")
REF_DEF = re.compile(r"^ {0,3}\[(?P<label>[^\]]+)\]:\s*(?:<(?P<angled>[^>]*)>|(?P<target>\S+))")
HREF = re.compile(r"""<(?:a|img|link|source)\b[^>]*?\b(?:href|src)\s*=\s*(["'])(?P<target>.*?)\1""", re.I)
HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.+?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"(?P<id>[^\"]+)\"")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced blocks, inline code blanked out."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line) or (fenced and re.match(r"^\s*```\s*$", line)):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, re.sub(r"`[^`]*`", lambda m: " " * len(m.group(0)), line)))
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link: inline, reference definitions, and HTML href / src."""
    found = []
    for n, line in prose_lines(path):
        found += [(n, m.group("target")) for m in LINK.finditer(line)]
        found += [(n, m.group("target")) for m in HREF.finditer(line)]
        m = REF_DEF.match(line)
        if m:
            found.append((n, m.group("angled") if m.group("angled") is not None else m.group("target")))
    return found


def _label(text: str) -> str:
    return " ".join(text.split()).casefold()


def undefined_references(path: Path) -> list[tuple[int, str]]:
    """(line, label) of each `[text][label]` whose label no `[label]: target` defines."""
    lines = prose_lines(path)
    defined = {_label(m.group("label")) for _, line in lines if (m := REF_DEF.match(line))}
    return [
        (n, m.group("label") or m.group("text"))
        for n, line in lines
        for m in REF_LINK.finditer(line)
        if _label(m.group("label") or m.group("text")) not in defined
    ]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text as rendered (code spans keep their content, links
    their text), lower-cased, every character dropped that is not a letter, mark, number, '_', '-'
    or space, then each space turned into '-' (github-slugger's rules)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").lower()
    kept = "".join(
        ch
        for ch in text
        if ch in " -_" or unicodedata.category(ch)[0] in "LMN" or unicodedata.category(ch) == "Pc"
    )
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every `#anchor` a link into `path` may use: its headings' slugs (a repeated one gets -1, -2,
    ... as on GitHub) and explicit `<a name=...>` / `<a id=...>` anchors."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line) or (fenced and re.match(r"^\s*```\s*$", line)):
            fenced = not fenced
            continue
        if fenced:
            continue
        found.update(m.group("id") for m in HTML_ANCHOR.finditer(line))
        m = HEADING.match(line)
        if m:
            slug = github_slug(m.group("text"))
            n = seen.get(slug, 0)
            found.add(slug if n == 0 else f"{slug}-{n}")
            seen[slug] = n + 1
    return found


# ---------------------------------------------------------------------------------------------
# Inline code and where it stands


@dataclass(frozen=True)
class Span:
    """An inline code span of the prose: its text, its line, the spans before it in the same
    paragraph, list item or table row (nearest first), and the headings above it (innermost first)."""

    line: int
    text: str
    before: tuple[str, ...]
    headings: tuple[str, ...]


CODE_SPAN = re.compile(r"(?<!`)(?P<ticks>`+)(?!`)(?P<code>.+?)(?<!`)(?P=ticks)(?!`)", re.S)
NEW_UNIT = re.compile(r"^\s*([-*+]\s|\d+[.)]\s|\|)")


def code_spans(path: Path) -> list[Span]:
    """Every inline code span outside fenced blocks, with its context (a span may cross lines)."""
    units: list[list[tuple[int, str]]] = []
    headings: dict[int, str] = {}
    unit_headings: list[tuple[str, ...]] = []
    fenced, current = False, None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line) or (fenced and re.match(r"^\s*```\s*$", line)):
            fenced, current = not fenced, None
            continue
        heading = HEADING.match(line)
        if fenced or not line.strip() or heading or NEW_UNIT.match(line) or current is None:
            current = None
        if fenced or not line.strip():
            continue
        if heading:
            level = len(heading.group("hashes"))
            headings = {k: v for k, v in headings.items() if k < level}
        stack = tuple(headings[k] for k in sorted(headings, reverse=True))
        if current is None:
            current = []
            units.append(current)
            unit_headings.append(stack)
        current.append((n, line))
        if heading:
            headings[level] = heading.group("text")
            current = None
    found = []
    for unit, stack in zip(units, unit_headings, strict=True):
        text = "\n".join(line for _, line in unit)
        starts = [0]
        for _, line in unit:
            starts.append(starts[-1] + len(line) + 1)
        seen: list[str] = []
        for m in CODE_SPAN.finditer(text):
            row = max(i for i, s in enumerate(starts) if s <= m.start())
            code = " ".join(m.group("code").split())
            found.append(Span(unit[row][0], code, tuple(reversed(seen)), stack))
            seen.append(code)
    return found
