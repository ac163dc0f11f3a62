"""Running the commands of README.md and docs/*.md at tiny size, and parsing the ones that cannot run.

THE RULES (a failure's message shows the command as written and as it ran)

Where. Each markdown file runs in a copy of a scratch directory holding what a reader has after
`make train`: `configs/` (a copy), `data/tinyshakespeare.txt` (the first CORPUS_CHARS characters of
the shipped corpus), `scripts/` and `docs/` (links to the repository's), and a `make train` run at
tiny size (`runs/tiny-shakespeare`, `tokenizers/tiny-shakespeare`, `.cache/moe_lm`). A file's steps
run in order; the first that fails stops it.

What runs, and how:
 1. `moe-lm ARGS`, `.venv/bin/moe-lm ARGS`, `python -m moe_lm ARGS`: `moe_lm.cli.main(ARGS)` in this
    process; it must return 0.
 2. `train` (also under `moe-lm launch`, in make's recipes, and a python script whose first argument
    is a YAML config): TINY_OVERRIDES go right after the config, before the line's own overrides
    (which still win); then each of STEP_KEYS, as the config and the line set it, is divided by
    STEP_SCALE, rounded up, and appended: the 800 steps of tiny-shakespeare.yaml are 4, evaluation
    every 200 steps is every step, and `train.max_steps=1200` on a line is 6.
 3. `checkpoints/step-N` in any argument is `checkpoints/step-M`, M = N / STEP_SCALE rounded up.
 4. `routing` reads ROUTING_TOKENS tokens per data set unless the line sets `--max-tokens`, and
    `eval` EVAL_BATCHES batches per validation set unless it sets `--max-batches`.
 5. `moe-lm launch`: `--num_cpu_threads_per_process` is 1, `--main_process_port` a free port unless
    the line sets one (so concurrent test runs do not collide), and the command it launches follows
    these rules; its workers are processes of their own, as for a user.
 6. `make TARGET [VAR=value ...]`: `make -n` in the repository prints the recipe, and each
    `python -m moe_lm` command in it runs by these rules, with the recipe's `VAR=value` prefixes in
    its environment. A target whose recipe runs no moe-lm command must be marked as not run.
 7. `python -c CODE` runs in this process; `python SCRIPT ARGS` runs the script in this process as
    `__main__` with those arguments (and rule 2 if the first is a YAML config).
 8. `accelerate launch ... -m moe_lm ARGS`: accelerate's launcher (a free port as in rule 5), ARGS
    by these rules.
 9. SHELL_TOOLS (`mkdir`, `cp`, ...) and any line with a pipe, `;`, `&&` or a redirection: bash, with
    the environment's `moe-lm` and `python` first on PATH; no rewriting.
10. A `yaml` or `python` block whose first line is `# PATH` is written to PATH before the steps after it.
Any other program must be marked as not run.

A line ending in `# not run in tests: REASON` is only parsed: `$VARIABLES` read as 0; a moe-lm command
must pass its own argparse parser (under `moe-lm launch`, accelerate's first), and its config file
must exist and load with its overrides (so they are real keys); `make` must know the target
(`make -n`), and the moe-lm commands of its recipe are parsed the same way; a python script must
exist and, if it uses argparse, accept its arguments; `python -m MODULE` must name an importable
module, and for `-m pytest` every test path it names must exist in the repository. Other programs (`hf`, `wandb`, ...) only need
the mark.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.docs.markdown import REPO, Command, FileBlock, steps

CORPUS_CHARS = 150_000
STEP_SCALE = 200
STEP_KEYS = (
    "train.max_steps",
    "train.stop_at_step",
    "train.eval_every",
    "train.sample_every",
    "checkpoint.every",
    "optim.warmup_steps",
    "logging.log_every",
)
TINY_OVERRIDES = (
    "train.micro_batch_size=2",
    "data.seq_len=32",
    "train.eval_batches=2",
    "train.sample_tokens=8",
    "logging.progress_bar=false",
)
ROUTING_TOKENS = 1024
EVAL_BATCHES = 2
SHELL_TOOLS = {"cp", "mkdir", "ls", "cat", "echo", "printf", "head", "tail", "touch", "mv", "rm"}
TEMPLATE_RUN = "moe-lm train configs/tiny-shakespeare.yaml train.overwrite=true"


class StepFailed(AssertionError):
    pass


@dataclass
class Ran:
    """One step of a file: what it was, what ran (after the rules), exit code and output."""

    step: Command | FileBlock
    ran: str = ""
    code: int = 0
    output: str = ""
    parsed_only: bool = False


@dataclass
class DocRun:
    root: Path
    steps: list[Ran] = field(default_factory=list)

    def output_of(self, fragment: str) -> str:
        """The output of the first run step whose text contains `fragment`."""
        for r in self.steps:
            if isinstance(r.step, Command) and fragment in r.step.text and not r.parsed_only:
                return r.output
        raise AssertionError(f"no command containing {fragment!r} ran")


# ---------------------------------------------------------------------------------------------
# The scratch directory


def build_template(root: Path) -> None:
    """What a reader has after `make train`, at tiny size."""
    shutil.copytree(REPO / "configs", root / "configs")
    (root / "data").mkdir()
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:CORPUS_CHARS]
    (root / "data" / "tinyshakespeare.txt").write_text(text)
    for name in ("scripts", "docs"):
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    Sandbox(root).run(Command("(template: make train)", TEMPLATE_RUN, None))


def run_doc(path: Path, template: Path, workdir: Path) -> DocRun:
    root = workdir / path.stem
    shutil.copytree(template, root, symlinks=True)
    box = Sandbox(root)
    return DocRun(root, [box.run(step) for step in steps(path)])


# ---------------------------------------------------------------------------------------------
# Recognising commands


def _is_python(token: str) -> bool:
    return re.fullmatch(r"python(3(\.\d+)?)?", token.rsplit("/", 1)[-1]) is not None


def moe_lm_argv(tokens: list[str]) -> list[str] | None:
    """The arguments of a moe-lm command in any of its spellings, else None."""
    if tokens and tokens[0].rsplit("/", 1)[-1] == "moe-lm":
        return tokens[1:]
    if (
        len(tokens) >= 3
        and _is_python(tokens[0])
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


# ---------------------------------------------------------------------------------------------
# The rules


def scaled(n: int) -> int:
    return math.ceil(n / STEP_SCALE) if n > 0 else n


def _scale_paths(arg: str) -> str:
    return re.sub(r"(checkpoints/step-)(\d+)", lambda m: f"{m.group(1)}{scaled(int(m.group(2)))}", arg)


def tiny_config_args(args: list[str], root: Path) -> list[str]:
    """CONFIG [overrides] -> CONFIG TINY_OVERRIDES [overrides] [scaled step counts] (rules 2, 3)."""
    from moe_lm.config import load_config

    config, overrides = args[0], args[1:]
    cfg = load_config(root / config, overrides)
    counts = []
    for key in STEP_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            counts.append(f"{key}={scaled(value)}")
    return [config, *TINY_OVERRIDES, *map(_scale_paths, overrides), *counts]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launcher_options(options: list[str]) -> list[str]:
    """accelerate launch's options after rule 5."""
    options = list(options)
    for i, option in enumerate(options[:-1]):
        if option == "--num_cpu_threads_per_process":
            options[i + 1] = "1"
    if "--main_process_port" not in options:
        options += ["--main_process_port", free_port()]
    return options


def tiny_argv(argv: list[str], root: Path) -> list[str]:
    """A moe-lm command's arguments after rules 2 to 5."""
    if not argv:
        return argv
    name = argv[0]
    if name == "launch":
        from moe_lm.cli import COMMANDS
        from moe_lm.cli.launch import split_argv

        options, command = split_argv(argv[1:], set(COMMANDS) - {"launch"})
        return ["launch", *launcher_options(options), *tiny_argv(command, root)]
    if name == "train":
        return ["train", *tiny_config_args(argv[1:], root)]
    rest = [_scale_paths(a) for a in argv[1:]]
    if name == "routing" and "--max-tokens" not in rest:
        return ["routing", *rest, "--max-tokens", str(ROUTING_TOKENS)]
    if name == "eval" and "--max-batches" not in rest:
        return ["eval", *rest, "--max-batches", str(EVAL_BATCHES)]
    return [name, *rest]


# ---------------------------------------------------------------------------------------------
# Running


def _exit_code(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


class _Parsed(Exception):
    """Raised in place of running a command once its parser has accepted the arguments."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


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


class Sandbox:
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def _inside(
        self, env: dict[str, str] | None = None, argv: list[str] | None = None
    ) -> Iterator[io.StringIO]:
        """cwd, environment and sys.argv of an in-process command, restored after; its output."""
        saved_env, saved_argv, saved_path, cwd = dict(os.environ), sys.argv, list(sys.path), os.getcwd()
        out = io.StringIO()
        os.chdir(self.root)
        os.environ.update(env or {})
        if argv is not None:
            sys.argv = argv
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                yield out
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            sys.argv, sys.path[:] = saved_argv, saved_path

    def run(self, step: Command | FileBlock) -> Ran:
        if isinstance(step, FileBlock):
            path = self.root / step.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(step.content)
            return Ran(step, ran=f"wrote {step.path}")
        if step.not_run is not None:
            self.check(step)
            return Ran(step, ran="(parsed only)", parsed_only=True)
        ran = self._run(step)
        if ran.code != 0:
            raise StepFailed(
                f"{step.where}: `{step.text}` exited with {ran.code}\n  ran as: {ran.ran}\n"
                f"--- output ---\n{ran.output[-4000:]}"
            )
        return ran

    def _run(self, step: Command) -> Ran:
        text = step.text
        if needs_shell(text):
            return self._bash(step)
        env, tokens = split_env(shlex.split(text))
        argv = moe_lm_argv(tokens)
        if argv is not None:
            return self._moe_lm(step, tiny_argv(argv, self.root), env)
        program = tokens[0]
        if program == "make":
            code, lines, output = make_recipe(tokens[1:])
            commands = recipe_commands(lines)
            if code != 0 or not commands:
                raise StepFailed(
                    f"{step.where}: `{text}` runs no moe-lm command the docs tests can run "
                    f"(make -n said: {output.strip()[:500]}); mark it `# not run in tests: REASON`"
                )
            results = [self._moe_lm(step, tiny_argv(a, self.root), {**env, **e}) for e, a in commands]
            bad = next((r for r in results if r.code != 0), results[-1])
            return Ran(
                step, " && ".join(r.ran for r in results), bad.code, "".join(r.output for r in results)
            )
        if _is_python(program):
            return self._python(step, tokens[1:], env)
        if program == "accelerate" and tokens[1:2] == ["launch"]:
            return self._accelerate(step, tokens, env)
        if program in SHELL_TOOLS:
            return self._bash(step)
        raise StepFailed(
            f"{step.where}: the docs tests cannot run `{program}`; run it some other way or mark the line "
            "`# not run in tests: REASON`"
        )

    def _moe_lm(self, step: Command, argv: list[str], env: dict[str, str]) -> Ran:
        from moe_lm.cli import main

        shown = "moe-lm " + shlex.join(argv)
        with self._inside(env) as out:
            try:
                code = main(argv)
            except SystemExit as e:
                code = _exit_code(e)
            except Exception:  # a crash, not a user error: its traceback goes into the message
                code, _ = 1, out.write(traceback.format_exc())
        return Ran(step, shown, code, out.getvalue())

    def _python(self, step: Command, args: list[str], env: dict[str, str]) -> Ran:
        if args[:1] == ["-c"]:
            with self._inside(env) as out:
                try:
                    exec(compile(args[1], step.where, "exec"), {"__name__": "__main__"})
                    code = 0
                except SystemExit as e:
                    code = _exit_code(e)
                except Exception:
                    code, _ = 1, out.write(traceback.format_exc())
            return Ran(step, "python -c ...", code, out.getvalue())
        script, rest = args[0], args[1:]
        if rest and rest[0].endswith((".yaml", ".yml")):
            rest = tiny_config_args(rest, self.root)
        shown = "python " + shlex.join([script, *rest])
        with self._inside(env, [script, *rest]) as out:
            sys.path.insert(0, str((self.root / script).parent))
            try:
                runpy.run_path(script, run_name="__main__")
                code = 0
            except SystemExit as e:
                code = _exit_code(e)
            except Exception:
                code, _ = 1, out.write(traceback.format_exc())
        return Ran(step, shown, code, out.getvalue())

    def _accelerate(self, step: Command, tokens: list[str], env: dict[str, str]) -> Ran:
        i = tokens.index("-m")
        argv = tiny_argv(tokens[i + 2 :], self.root)
        launch = [tokens[1], *launcher_options(tokens[2:i]), *tokens[i : i + 2]]
        cmd = [str(Path(sys.executable).parent / "accelerate"), *launch, *argv]
        proc = subprocess.run(
            cmd, cwd=self.root, env={**os.environ, **env}, capture_output=True, text=True, timeout=300
        )
        return Ran(step, shlex.join(cmd), proc.returncode, proc.stdout + proc.stderr)

    def _bash(self, step: Command) -> Ran:
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
        proc = subprocess.run(
            ["bash", "-c", step.text],
            cwd=self.root,
            env={**os.environ, "PATH": path},
            capture_output=True,
            text=True,
            timeout=300,
        )
        return Ran(step, f"bash -c {shlex.quote(step.text)}", proc.returncode, proc.stdout + proc.stderr)

    # ---- parsing only -----------------------------------------------------------------------

    def check(self, step: Command) -> None:
        """A line marked as not run: it must at least parse (see THE RULES)."""
        text = re.sub(r"\$\{?[A-Za-z_]\w*\}?", "0", step.text)
        env, tokens = split_env(shlex.split(text))
        argv = moe_lm_argv(tokens)
        try:
            if argv is not None:
                self.check_moe_lm(argv)
            elif tokens[0] == "make":
                code, lines, output = make_recipe(tokens[1:])
                if code != 0:
                    raise StepFailed(f"make -n failed: {output.strip()[:500]}")
                for _, recipe_argv in recipe_commands(lines):
                    self.check_moe_lm(recipe_argv)
            elif _is_python(tokens[0]) and tokens[1:2] == ["-m"]:
                check_module(tokens[2], tokens[3:])
            elif _is_python(tokens[0]) and tokens[1:2] != ["-c"]:
                self.check_script(tokens[1], tokens[2:])
            elif tokens[0] == "accelerate" and tokens[1:2] == ["launch"]:
                self.check_moe_lm(tokens[tokens.index("-m") + 2 :])
        except StepFailed as e:
            raise StepFailed(f"{step.where}: `{step.text}` (not run) does not parse: {e}") from None

    def check_moe_lm(self, argv: list[str]) -> None:
        from moe_lm.cli import COMMANDS, main
        from moe_lm.config import load_config
        from moe_lm.errors import UserError

        with self._inside() as out:
            try:
                if argv and argv[0] == "launch":
                    from moe_lm.cli.launch import accelerate_args, split_argv

                    options, command = split_argv(argv[1:], set(COMMANDS) - {"launch"})
                    accelerate_args(options, command)
                    self.check_moe_lm(command)
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

    def check_script(self, script: str, args: list[str]) -> None:
        path = self.root / script
        if not path.is_file():
            raise StepFailed(f"no script {script}")
        if "argparse" not in path.read_text():
            return
        with self._inside(argv=[script, *args]):
            sys.path.insert(0, str(path.parent))
            try:
                with _parse_only():
                    runpy.run_path(script, run_name="__main__")
                raise StepFailed(f"{script} ran to the end without parsing its arguments")
            except _Parsed:
                pass
            except SystemExit as e:
                raise StepFailed(f"{script} {shlex.join(args)}: its parser refused (exit {e.code})") from None


def check_module(module: str, args: list[str]) -> None:
    """`python -m MODULE ARGS` marked as not run: the module imports; pytest's test paths exist."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise StepFailed(f"no module {module}")
    if module == "pytest":
        for arg in args:
            if (
                not arg.startswith("-")
                and arg.startswith("tests")
                and not (REPO / arg.split("::")[0]).exists()
            ):
                raise StepFailed(f"no test path {arg}")
