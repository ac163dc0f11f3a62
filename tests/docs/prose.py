"""Flags and config keys written in the text of README.md and docs/*.md (inline code, not commands).

- A span that is a `--flag` (or starts with one: `--threads 1 --clock cpu`) names options of the
  program the text is about: the nearest program named in an earlier span of the same paragraph,
  list item or table row, else in the nearest heading above that names one; with none named, any
  moe-lm command, `accelerate launch` or scripts/*.py. A span that is a command of one of those
  (`moe-lm info CONFIG --json`, `scripts/bench_train.py --device cuda`) has its flags checked against
  that program. Other programs' flags are written with the program (`pip install --no-deps`).
- A span that looks like a config key (`train.max_steps`, `data.sources.NAME.weight`, optionally
  with `=value` or `: value`, or several `key=value` separated by spaces) is a key the strict loader
  knows (moe_lm/config.py; any entry name, NAME included, inside `data.sources` / `data.val_sources`),
  and its value, unless an upper-case placeholder (`PATH`, `N`), has the key's type. A key shown as a
  mistake, with its correction after an arrow (`model.num_expert` → ...), is not checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from tests.docs.markdown import REPO, Span, code_spans, rel
from tests.docs.parse_only import moe_lm_parser, options_of, script_parser

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
# A dotted name whose last part is one of these is a file (`model.safetensors`, `hub.py`), not a key.
FILE_SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "yml", "txt", "safetensors", "pt", "png", "csv", "html"}
KEY = r"[a-z_]+(?:\.[A-Za-z_][\w-]*)+"
# key, key=value, key: value (one word: `key: message text` is an error message), key/path
KEY_SPAN = re.compile(rf"(?P<key>{KEY})(?:(?P<sep>=|:(?=\s*\S*$)\s*|/)(?P<value>.*))?")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*(\.\.\.)?")


# ---------------------------------------------------------------------------------------------
# Programs and their options


@functools.cache
def program_options() -> dict[str, frozenset[str]]:
    """'moe-lm NAME' (every command), 'accelerate launch' and 'scripts/X.py' -> their options."""
    from moe_lm.cli import COMMANDS

    found = {f"moe-lm {name}": frozenset(options_of(moe_lm_parser(name))) for name in COMMANDS}
    found["accelerate launch"] = found["moe-lm launch"]
    for script in sorted((REPO / "scripts").glob("*.py")):
        parser = script_parser(script)
        found[f"scripts/{script.name}"] = frozenset(options_of(parser)) if parser else frozenset()
    return found


def program_of(code: str) -> str | None:
    """The program a span is a command of, as a key of program_options(), else None."""
    from moe_lm.cli import COMMANDS

    words = code.split()
    while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
        words = words[1:]  # VAR=value prefixes
    if len(words) >= 3 and re.fullmatch(r"(\S*/)?python3?", words[0]) and words[1] == "-m":
        words = ["moe-lm", *words[3:]] if words[2] in ("moe_lm", "moe_lm.cli") else []
    elif words and re.fullmatch(r"(\S*/)?python3?", words[0]):
        words = words[1:]
    if not words:
        return None
    if words[0].rsplit("/", 1)[-1] == "moe-lm" and len(words) > 1 and words[1] in COMMANDS:
        return f"moe-lm {words[1]}"
    if words[:2] == ["accelerate", "launch"]:
        return "accelerate launch"
    script = words[0].rsplit("/", 1)[-1]
    if (
        script.endswith(".py")
        and words[0] in (script, f"scripts/{script}")
        and (REPO / "scripts" / script).is_file()
    ):
        return f"scripts/{script}"
    return None


def _context(span: Span) -> str | None:
    for code in span.before:
        if (program := program_of(code)) is not None:
            return program
    for heading in span.headings:
        for m in re.finditer(r"`([^`]+)`", heading):
            if (program := program_of(m.group(1))) is not None:
                return program
    return None


def flag_problems(path: Path) -> list[str]:
    options = program_options()
    everything = frozenset().union(*options.values())
    problems = []
    for span in code_spans(path):
        own = program_of(span.text)
        if own is not None:
            flags, program = FLAG.findall(span.text.split("|")[0]), own
        elif FLAG.match(span.text):
            flags, program = FLAG.findall(span.text), _context(span)
        else:
            continue
        known = options[program] if program else everything
        where = (
            f"the options of {program}"
            if program
            else "any moe-lm command, accelerate launch or scripts/*.py"
        )
        problems += [
            f"{rel(path)}:{span.line}: `{span.text}`: {f} is not among {where}"
            for f in flags
            if f not in known
        ]
    return problems


# ---------------------------------------------------------------------------------------------
# Config keys


class KeyProblem(Exception):
    pass


def key_type(key: str) -> Any:
    """The type the strict loader gives `key` (a.b.c); KeyProblem names the unknown part."""
    from moe_lm.config import Config

    tp: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if dataclasses.is_dataclass(tp):
            hints = get_type_hints(tp)
            if part not in hints:
                close = difflib.get_close_matches(part, list(hints), n=1)
                hint = f"; did you mean '{'.'.join([*parts[:i], close[0]])}'?" if close else ""
                raise KeyProblem(f"unknown config key '{here}'{hint}")
            tp = hints[part]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]  # an entry's name: any
        else:
            raise KeyProblem(f"'{'.'.join(parts[:i])}' is a value, not a section, so '{here}' is no key")
    return tp


def _key_words(code: str) -> list[re.Match[str]]:
    """The key[=value] words of a span that is made of them, else []."""
    whole = KEY_SPAN.fullmatch(code)
    if whole and whole.group("sep") not in ("=",):
        words = [whole]
    else:
        words = [KEY_SPAN.fullmatch(w) for w in code.split()]
        if not all(words) or len(words) > 1 and not all(w.group("sep") == "=" for w in words if w):
            return []
    from moe_lm.config import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    return [
        w
        for w in words
        if w
        and w.group("key").split(".")[0] in sections
        and w.group("key").rsplit(".", 1)[-1] not in FILE_SUFFIXES
    ]


def key_problems(path: Path) -> list[str]:
    from moe_lm.config import _coerce
    from moe_lm.errors import ConfigError

    problems = []
    text = path.read_text()
    for span in code_spans(path):
        for word in _key_words(span.text):
            key, value = word.group("key"), (word.group("value") or "").strip()
            if re.search(rf"`{re.escape(span.text)}`\s*→", text):
                continue  # a mistake shown with its correction
            try:
                tp = key_type(key)
                if word.group("sep") not in (None, "/") and value and not PLACEHOLDER.fullmatch(value):
                    _coerce(yaml.safe_load(value), tp, key)
            except (KeyProblem, ConfigError, yaml.YAMLError) as e:
                problems.append(f"{rel(path)}:{span.line}: `{span.text}`: {e}")
    return problems
