"""Lines marked `# not run in tests: REASON`: what they must pass instead of running (THE RULES in
tests/docs/commands.py). Also how the docs tests reach a program's argument parser without running
the program."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.docs import shell
from tests.docs.markdown import REPO, Command
from tests.docs.recognise import is_python, make_recipe, moe_lm_argv, recipe_commands, split_env

if TYPE_CHECKING:
    from tests.docs.commands import Sandbox


class StepFailed(AssertionError):
    pass


class _Parsed(Exception):
    """Raised in place of running a command once its parser has accepted the arguments."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


class _Parser(Exception):
    """Raised in place of parsing: the parser a program built, to read its options."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@contextlib.contextmanager
def _parse_only() -> Iterator[None]:
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: Any, args: Any = None, namespace: Any = None) -> Any:
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _parser_only() -> Iterator[None]:
    """Any parse (parse_args, parse_known_args) raises _Parser instead: nothing after it runs."""
    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def stop(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise _Parser(self)

    argparse.ArgumentParser.parse_args = stop  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = stop  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved  # type: ignore[method-assign]


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of its sub-commands' parsers."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= options_of(sub)
    return found


def moe_lm_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `moe-lm NAME` (`launch`: accelerate launch's)."""
    if name == "launch":
        from accelerate.commands.launch import launch_command_parser

        return launch_command_parser()
    from moe_lm.cli import main

    with _parser_only(), open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        try:
            main([name])
        except _Parser as p:
            return p.parser
    raise AssertionError(f"moe-lm {name} parsed no arguments")


def script_parser(script: Path) -> argparse.ArgumentParser | None:
    """The parser a script builds (None: it uses no argparse), read without running the script."""
    if "argparse" not in script.read_text():
        return None
    saved_argv, saved_path, saved_env = sys.argv, list(sys.path), dict(os.environ)
    sys.argv = [str(script)]
    sys.path.insert(0, str(script.parent))
    try:  # scripts set environment variables at import (WANDB_MODE, ...): none may outlive this
        with _parser_only(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            runpy.run_path(str(script), run_name="__main__")
    except _Parser as p:
        return p.parser
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)
    raise AssertionError(f"{script} ran to the end without parsing its arguments")


# ---------------------------------------------------------------------------------------------
# A line that is only parsed


def expand(words: str, variables: dict[str, str]) -> str:
    """$NAME and ${NAME}: a variable the line set, else 0."""
    return re.sub(
        r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), "0").replace("\\", "/"), words
    )


def check(box: Sandbox, step: Command) -> None:
    """Each simple command of the line in order, through `;`, `&&`, pipes and subshells; a bare
    `NAME=value` sets a variable for the commands after it; `cd` and other programs need the mark only."""
    variables = {"PWD": str(box.root)}
    try:
        for simple in shell.simple_commands(shell.parse(step.text)):
            env, tokens = split_env(shlex.split(expand(simple.words, variables)))
            if not tokens:
                variables.update(env)
                continue
            argv = moe_lm_argv(tokens)
            if argv is not None:
                check_moe_lm(box, argv)
            elif tokens[0] == "make":
                code, lines, output = make_recipe(tokens[1:])
                if code != 0:
                    raise StepFailed(f"make -n failed: {output.strip()[:500]}")
                for _, recipe_argv in recipe_commands(lines):
                    check_moe_lm(box, recipe_argv)
            elif is_python(tokens[0]) and tokens[1:2] == ["-m"]:
                check_module(tokens[2], tokens[3:], env)
            elif is_python(tokens[0]) and tokens[1:2] != ["-c"]:
                check_script(box, tokens[1], tokens[2:])
            elif tokens[0] == "accelerate" and tokens[1:2] == ["launch"]:
                check_moe_lm(box, tokens[tokens.index("-m") + 2 :])
    except (StepFailed, ValueError) as e:
        raise StepFailed(f"{step.where}: `{step.text}` (not run) does not parse: {e}") from None


def check_moe_lm(box: Sandbox, argv: list[str]) -> None:
    from moe_lm.cli import COMMANDS, main
    from moe_lm.config import load_config
    from moe_lm.errors import UserError

    with box._inside() as out:
        try:
            if argv and argv[0] == "launch":
                from moe_lm.cli.launch import accelerate_args, split_argv

                options, command = split_argv(argv[1:], set(COMMANDS) - {"launch"})
                accelerate_args(options, command)
                check_moe_lm(box, command)
                return
            with _parse_only():
                code = main(argv)
            raise StepFailed(
                f"`moe-lm {shlex.join(argv)}` ended with {code} before parsing: {out.getvalue()}"
            )
        except _Parsed as parsed:
            ns = parsed.namespace
        except UserError as e:
            raise StepFailed(f"`moe-lm {shlex.join(argv)}`: {e}") from None
        try:  # the config file exists and loads with the overrides: they are real keys
            if getattr(ns, "config", None):
                load_config(ns.config, list(getattr(ns, "overrides", None) or []))
        except UserError as e:
            raise StepFailed(f"`moe-lm {shlex.join(argv)}`: {e}") from None


def check_script(box: Sandbox, script: str, args: list[str]) -> None:
    path = box.root / script
    if not path.is_file():
        raise StepFailed(f"no script {script}")
    if "argparse" not in path.read_text():
        return
    with box._inside(argv=[script, *args]):
        sys.path.insert(0, str(path.parent))
        try:
            with _parse_only():
                runpy.run_path(script, run_name="__main__")
            raise StepFailed(f"{script} ran to the end without parsing its arguments")
        except _Parsed:
            pass
        except SystemExit as e:
            raise StepFailed(f"{script} {shlex.join(args)}: its parser refused (exit {e.code})") from None


def check_module(module: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """`python -m MODULE ARGS`: the module imports (from the line's PYTHONPATH where it sets one
    that exists here; one that does not is a folder the guide has the reader make, unchecked); for
    pytest, every test path exists and `-k EXPR` selects at least one test."""
    env = env or {}
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if extra and not all(Path(p).is_dir() for p in extra):
        return
    saved = list(sys.path)
    sys.path[:0] = extra
    try:
        found = importlib.util.find_spec(module) is not None
    finally:
        sys.path[:] = saved
    if not found:
        raise StepFailed(f"no module {module}")
    if module != "pytest":
        return
    for arg in args:
        if not arg.startswith("-") and arg.startswith("tests") and not (REPO / arg.split("::")[0]).exists():
            raise StepFailed(f"no test path {arg}")
    if "-k" in args:
        selected = pytest_collects(tuple(args))
        if selected is not None:
            raise StepFailed(f"`pytest {shlex.join(args)}` selects no test ({selected})")


@functools.cache
def pytest_collects(args: tuple[str, ...]) -> str | None:
    """None when `pytest ARGS` selects at least one test (collection only), else pytest's last line."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 0:
        return None
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return f"pytest --collect-only exited {proc.returncode}: {lines[-1] if lines else ''}"
