"""Print the config reference (every key, its type, default and meaning) as markdown for the README.

The meaning comes from the comment beside each field in moe_lm/config.py, so the two never drift.
Run: .venv/bin/python scripts/config_reference.py
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from moe_lm.config import Config, DataConfig, SourceConfig


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


def main() -> None:
    defaults = Config()
    for section in dataclasses.fields(Config):
        if section.name == "name":
            print(
                "`name` (str, default: the config file's stem): names the run and its default output dir.\n"
            )
            continue
        cls = type(getattr(defaults, section.name))
        table(f"**`{section.name}:`**", cls, getattr(defaults, section.name))
        if cls is DataConfig:  # the entries of data.sources and data.val_sources
            table("**`data.sources.NAME:` and `data.val_sources.NAME:`**", SourceConfig, SourceConfig())


def table(title: str, cls: type, defaults: object) -> None:
    comments = field_comments(cls)
    print(f"{title}\n")
    print("| key | type | default | meaning |")
    print("|---|---|---|---|")
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        shown = "null" if value is None else repr(value).replace("|", "\\|")
        kind = str(hints[f.name]).replace("|", "\\|")
        print(f"| `{f.name}` | `{kind}` | `{shown}` | {comments.get(f.name, '')} |")
    print()


if __name__ == "__main__":
    main()
