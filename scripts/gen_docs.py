"""Regenerate the parts of the docs that are written from the code, so the two never drift apart:

    README.md              the command table, from COMMANDS and USAGE in moe_lm/cli/__init__.py
                           (the same rows `moe-lm --help` prints)
    docs/configuration.md  the config reference: every key, its type, default and meaning, from the
                           dataclasses in moe_lm/config.py and the comment beside each field

Each generated part sits between `<!-- BEGIN GENERATED: NAME ... -->` and `<!-- END GENERATED: NAME -->`;
the text around it is written by hand.

    python scripts/gen_docs.py           # rewrite the generated parts
    python scripts/gen_docs.py --check   # exit 1 and print a diff if any is stale (tests/docs does this)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

from moe_lm.cli import COMMANDS, USAGE, synopsis
from moe_lm.config import Config, DataConfig, SourceConfig

REPO = Path(__file__).resolve().parents[1]


def command_table() -> str:
    rows = ["| command | does | guide |", "|---|---|---|"]
    for name, (_, _, summary) in COMMANDS.items():
        guide = USAGE[name][1] if name in USAGE else ""
        link = f"[{Path(guide).stem}]({guide})" if guide else ""
        rows.append(f"| `{_cell(synopsis(name))}` | {_cell(summary)} | {link} |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def field_comments(cls: type) -> dict[str, str]:
    """The comment on a field's line, or on the next lines of a field that spans several."""
    comments: dict[str, str] = {}
    current = None
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=", line)
        if m:
            current = m.group(1)
        comment = re.search(r"#\s*(.*)$", line)
        if current and comment and current not in comments:
            comments[current] = comment.group(1)
    return comments


def config_reference() -> str:
    defaults = Config()
    parts = []
    for section in dataclasses.fields(Config):
        if section.name == "name":
            parts.append(
                "`name` (str, default: the config file's stem): names the run and its default output dir.\n"
            )
            continue
        cls = type(getattr(defaults, section.name))
        parts.append(_table(f"**`{section.name}:`**", cls, getattr(defaults, section.name)))
        if cls is DataConfig:  # the entries of data.sources and data.val_sources
            parts.append(
                _table("**`data.sources.NAME:` and `data.val_sources.NAME:`**", SourceConfig, SourceConfig())
            )
    return "\n".join(parts)


def _table(title: str, cls: type, defaults: object) -> str:
    comments = field_comments(cls)
    lines = [title, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        shown = "null" if value is None else _cell(repr(value))
        lines.append(f"| `{f.name}` | `{_cell(str(f.type))}` | `{shown}` | {comments.get(f.name, '')} |")
    return "\n".join(lines) + "\n"


# name -> (file, what writes the part, the file it is generated from: named in the marker)
PARTS: dict[str, tuple[str, Callable[[], str], str]] = {
    "commands": ("README.md", command_table, "moe_lm/cli/__init__.py"),
    "config-reference": ("docs/configuration.md", config_reference, "moe_lm/config.py"),
}


def regenerate(text: str, name: str, body: str, source: str) -> str:
    """`text` with the part `name` replaced by `body`; the markers must be there already."""
    pattern = re.compile(
        rf"(<!-- BEGIN GENERATED: {re.escape(name)}\b[^\n]*-->\n).*?(<!-- END GENERATED: {re.escape(name)} -->)",
        re.S,
    )
    if not pattern.search(text):
        raise SystemExit(
            f"error: no `<!-- BEGIN GENERATED: {name} ... -->` ... `<!-- END GENERATED: {name} -->` markers; "
            "add them where the generated text goes"
        )
    begin = f"<!-- BEGIN GENERATED: {name} by scripts/gen_docs.py from {source}; edit that file instead -->\n"
    return pattern.sub(lambda m: f"{begin}\n{body}\n{m.group(2)}", text, count=1)


def generated_files(root: Path = REPO) -> dict[str, tuple[str, str]]:
    """file -> (its text now, its text with every generated part rewritten)."""
    files: dict[str, tuple[str, str]] = {}
    for name, (rel, render, source) in PARTS.items():
        now = (root / rel).read_text()
        current, new = files.get(rel, (now, now))
        files[rel] = (current, regenerate(new, name, render(), source))
    return files


def stale_parts(root: Path = REPO) -> dict[str, str]:
    """file -> a unified diff from what it holds to what it should hold, for each stale file."""
    return {
        rel: "".join(
            difflib.unified_diff(old.splitlines(True), new.splitlines(True), rel, f"{rel} (generated)")
        )
        for rel, (old, new) in generated_files(root).items()
        if old != new
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale parts (exit 1)")
    args = parser.parse_args(argv)
    stale = stale_parts()
    if args.check:
        for diff in stale.values():
            print(diff, end="")
        if stale:
            print(f"stale: {', '.join(stale)}; run `python scripts/gen_docs.py`", file=sys.stderr)
        return 1 if stale else 0
    for rel, (old, new) in generated_files().items():
        if old != new:
            (REPO / rel).write_text(new)
            print(f"rewrote the generated parts of {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
