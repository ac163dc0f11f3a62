"""Recognising the documented commands: the moe-lm command in its spellings, lines that need a
shell, `VAR=value` prefixes, and the moe-lm commands of a make recipe. Pure text and `make -n`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

from tests.docs.markdown import REPO


def is_python(token: str) -> bool:
    return re.fullmatch(r"python(3(\.\d+)?)?", token.rsplit("/", 1)[-1]) is not None


def moe_lm_argv(tokens: list[str]) -> list[str] | None:
    """The arguments of a moe-lm command in any of its spellings, else None."""
    if tokens and tokens[0].rsplit("/", 1)[-1] == "moe-lm":
        return tokens[1:]
    if (
        len(tokens) >= 3
        and is_python(tokens[0])
        and tokens[1] == "-m"
        and tokens[2] in ("moe_lm", "moe_lm.cli")
    ):
        return tokens[3:]
    return None


def needs_shell(text: str) -> bool:
    """A pipe, `;`, `&&`, a redirection or a command substitution outside quotes."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return any(set(tok) <= set("();<>|&") or "`" in tok or "$(" in tok for tok in lexer)


def split_env(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
        key, value = tokens[0].split("=", 1)
        env[key] = value
        tokens = tokens[1:]
    return env, tokens


def make_recipe(args: list[str]) -> tuple[int, list[str], str]:
    """(make -n's exit code, the recipe's lines with continuations joined, its output)."""
    proc = subprocess.run(
        ["make", "-n", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # `nproc` in the recipe reads it
        timeout=60,
    )
    lines, pending = [], ""
    for line in proc.stdout.splitlines():
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return proc.returncode, lines, proc.stdout + proc.stderr


def recipe_commands(lines: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """The moe-lm commands of a make recipe, each with its `VAR=value` prefixes."""
    found = []
    for line in lines:
        try:
            env, tokens = split_env(shlex.split(line))
        except ValueError:
            continue
        argv = moe_lm_argv(tokens)
        if argv is not None:
            found.append((env, argv))
    return found
