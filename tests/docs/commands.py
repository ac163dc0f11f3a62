"""Running the commands of README.md and docs/*.md at tiny size, and parsing the ones that cannot run.

THE RULES (a failure's message shows the command as written and as it ran)

Where. Each markdown file runs in a copy of a scratch directory holding what a reader has after
`make train`: `configs/` (a copy), `data/tinyshakespeare.txt` (the first CORPUS_CHARS characters of
the shipped corpus), `scripts/` and `docs/` (links to the repository's), `.venv/bin/` (`moe-lm`,
`python` and `activate`, which run this checkout's code: CODE first on PYTHONPATH) and a `make train`
run at tiny size (`runs/tiny-shakespeare`, `tokenizers/tiny-shakespeare`, `.cache/moe_lm`). A file's
steps run in order; the first that fails stops it. Every process a step starts imports moe_lm from
CODE, the checkout under test, not from wherever the environment installed it.

What runs, and how:
 1. `moe-lm ARGS`, `.venv/bin/moe-lm ARGS`, `python -m moe_lm ARGS`: `moe_lm.cli.main(ARGS)` in this
    process; it must return 0.
 2. `train` (also under `moe-lm launch`, in make's recipes, and a python script whose first argument
    is a YAML config): TINY_OVERRIDES go right after the config, before the line's own overrides
    (which still win); then each of STEP_KEYS, as the config and the line set it, is divided by
    STEP_SCALE, rounded up, and appended: the 800 steps of tiny-shakespeare.yaml are 4, evaluation
    every 200 steps is every step, and `train.max_steps=1200` on a line is 6.
 3. `checkpoints/step-N` in any argument is `checkpoints/step-M`, M = N / STEP_SCALE rounded up.
 4. `routing` reads ROUTING_TOKENS tokens per data set unless the line sets `--max-tokens`,
    `eval` EVAL_BATCHES batches per validation set unless it sets `--max-batches`, and `plan`
    rehearses the config's own layout (`--layouts config`) unless the line sets `--layouts` (the
    variants are the same rehearsal again; their list is tested in tests/unit/test_plan_parts.py).
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
 9. SHELL_TOOLS (`mkdir`, `cp`, `source`, ...): bash, with the scratch directory's `.venv/bin` first
    on PATH. A line with a pipe, `;`, `&&`, `||`, a subshell or a redirection runs in bash the same
    way, after each of its simple commands is rewritten by rules 1-8 (a moe-lm command, spelt any
    way, becomes `moe-lm` with its tiny arguments; `make TARGET` becomes its recipe's moe-lm commands
    in a `{ ...; }` group), so `moe-lm train ... | tee log` trains at tiny size too.
10. A `yaml` or `python` block whose first line is `# PATH` is written to PATH before the steps after it
    (what every `yaml` block must be is in tests/docs/yaml_blocks.py).
Any other program must be marked as not run.

A line ending in `# not run in tests: REASON` is only parsed, each of its simple commands in order
(through `;`, `&&`, pipes and subshells): a bare `NAME=value` sets $NAME for the commands after it,
`$PWD` is the scratch directory and any other `$VARIABLE` reads as 0; a moe-lm command must pass its
own argparse parser (under `moe-lm launch`, accelerate's first), and its config file must exist and
load with its overrides (so they are real keys); `make` must know the target (`make -n`), and the
moe-lm commands of its recipe are parsed the same way; a python script must exist and, if it uses
argparse, accept its arguments; `python -m MODULE` must name an importable module (looked for first
in the line's PYTHONPATH when that exists here; when it does not, the guide has the reader make it
and the module is not checked), and for `-m pytest` every test path it names must exist in the
repository and a `-k EXPR` must select at least one test (`pytest --collect-only`). `cd` and other
programs (`hf`, `wandb`, `git`, ...) only need the mark.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field, replace
from pathlib import Path

from tests.docs import parse_only, shell
from tests.docs.markdown import REPO, Command, FileBlock, steps
from tests.docs.parse_only import StepFailed
from tests.docs.recognise import (
    is_python,
    make_recipe,
    moe_lm_argv,
    needs_shell,
    recipe_commands,
    split_env,
)

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
SHELL_TOOLS |= {"source", "."}  # source .venv/bin/activate
TEMPLATE_RUN = "moe-lm train configs/tiny-shakespeare.yaml train.overwrite=true"
CODE = REPO  # the checkout whose moe_lm every documented command runs


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
    venv_bin(root)
    Sandbox(root).run(Command("(template: make train)", TEMPLATE_RUN, None))


def venv_bin(root: Path) -> Path:
    """ROOT/.venv/bin as a reader's checkout has it after `make`: `moe-lm` and `python` (this
    checkout's code whatever the environment installed) and `activate`."""
    bin_dir = root / ".venv" / "bin"
    if (bin_dir / "activate").is_file():
        return bin_dir
    bin_dir.mkdir(parents=True, exist_ok=True)
    pythonpath = f'PYTHONPATH={shlex.quote(str(CODE))}"${{PYTHONPATH:+:$PYTHONPATH}}"'
    for name, args in (("moe-lm", "-m moe_lm "), ("python", ""), ("python3", "")):
        (bin_dir / name).write_text(
            f'#!/bin/sh\n{pythonpath} exec {shlex.quote(sys.executable)} {args}"$@"\n'
        )
        (bin_dir / name).chmod(0o755)
    (bin_dir / "activate").write_text(
        'VIRTUAL_ENV="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/.." && pwd)"; export VIRTUAL_ENV\n'
        'PATH="$VIRTUAL_ENV/bin:$PATH"; export PATH\n'
    )
    return bin_dir


def child_env(root: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process a step starts: ROOT/.venv/bin first on PATH, CODE on PYTHONPATH."""
    merged = {**os.environ, **(env or {})}
    path = f"{venv_bin(root)}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{merged.get('PATH', '')}"
    pythonpath = os.pathsep.join(p for p in (str(CODE), merged.get("PYTHONPATH", "")) if p)
    return {**merged, "PATH": path, "PYTHONPATH": pythonpath}


def run_doc(path: Path, template: Path, workdir: Path) -> DocRun:
    root = workdir / path.stem
    shutil.copytree(template, root, symlinks=True)
    box = Sandbox(root)
    return DocRun(root, [box.run(step) for step in steps(path)])


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
    if name == "plan" and not any(a == "--layouts" or a.startswith("--layouts=") for a in rest):
        return ["plan", *rest, "--layouts", "config"]
    return [name, *rest]


# ---------------------------------------------------------------------------------------------
# Running


def _exit_code(e: SystemExit) -> int:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


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
        os.environ.update(child_env(self.root, env))
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
            parse_only.check(self, step)
            return Ran(step, ran="(parsed only)", parsed_only=True)
        ran = self._run(step)
        if ran.code != 0:
            raise StepFailed(
                f"{step.where}: `{step.text}` exited with {ran.code}\n  ran as: {ran.ran}\n"
                f"--- output ---\n{ran.output[-4000:]}"
            )
        return ran

    def check(self, step: Command) -> None:
        """A line marked as not run: it must at least parse (see THE RULES)."""
        parse_only.check(self, step)

    def _run(self, step: Command) -> Ran:
        text = step.text
        if needs_shell(text):
            return self._bash(step, self.tiny_line(step))
        env, tokens = split_env(shlex.split(text))
        argv = moe_lm_argv(tokens)
        if argv is not None:
            return self._moe_lm(step, tiny_argv(argv, self.root), env)
        program = tokens[0]
        if program == "make":
            commands = self._recipe(step, tokens[1:])
            results = [self._moe_lm(step, tiny_argv(a, self.root), {**env, **e}) for e, a in commands]
            bad = next((r for r in results if r.code != 0), results[-1])
            return Ran(
                step, " && ".join(r.ran for r in results), bad.code, "".join(r.output for r in results)
            )
        if is_python(program):
            return self._python(step, tokens[1:], env)
        if program == "accelerate" and tokens[1:2] == ["launch"]:
            return self._accelerate(step, tokens, env)
        if program in SHELL_TOOLS:
            return self._bash(step, text)
        raise StepFailed(
            f"{step.where}: the docs tests cannot run `{program}`; run it some other way or mark the line "
            "`# not run in tests: REASON`"
        )

    def _recipe(self, step: Command, args: list[str]) -> list[tuple[dict[str, str], list[str]]]:
        code, lines, output = make_recipe(args)
        commands = recipe_commands(lines)
        if code != 0 or not commands:
            raise StepFailed(
                f"{step.where}: `{step.text}` runs no moe-lm command the docs tests can run "
                f"(make -n said: {output.strip()[:500]}); mark it `# not run in tests: REASON`"
            )
        return commands

    def tiny_line(self, step: Command) -> str:
        """A line for bash with each of its simple commands rewritten by rules 1-8 (rule 9)."""
        try:
            items = shell.parse(step.text)
        except ValueError as e:
            raise StepFailed(f"{step.where}: `{step.text}`: {e}") from None
        return shell.render(shell.rewrite(items, lambda simple: self._tiny_simple(step, simple)))

    def _tiny_simple(self, step: Command, simple: shell.Simple) -> shell.Simple:
        try:
            env, tokens = split_env(shlex.split(simple.words))
        except ValueError:
            return simple
        if not tokens:
            return simple
        prefix = [f"{k}={v}" for k, v in env.items()]
        argv = moe_lm_argv(tokens)
        if argv is not None:
            words = shlex.join([*prefix, "moe-lm", *tiny_argv(argv, self.root)])
        elif tokens[0] == "make":
            recipe = self._recipe(step, tokens[1:])
            each = [
                shlex.join(
                    [*(f"{k}={v}" for k, v in {**env, **e}.items()), "moe-lm", *tiny_argv(a, self.root)]
                )
                for e, a in recipe
            ]
            words = "{ " + " && ".join(each) + "; }"
        elif is_python(tokens[0]) and tokens[2:3] and tokens[2].endswith((".yaml", ".yml")):
            words = shlex.join([*prefix, "python", tokens[1], *tiny_config_args(tokens[2:], self.root)])
        elif tokens[0] == "accelerate" and tokens[1:2] == ["launch"]:
            words = shlex.join([*prefix, *self._accelerate_argv(tokens)])
        else:
            return simple
        return replace(simple, words=words)

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

    def _accelerate_argv(self, tokens: list[str]) -> list[str]:
        """`accelerate launch OPTIONS -m moe_lm ARGS` after rule 8."""
        i = tokens.index("-m")
        argv = tiny_argv(tokens[i + 2 :], self.root)
        return ["accelerate", tokens[1], *launcher_options(tokens[2:i]), *tokens[i : i + 2], *argv]

    def _accelerate(self, step: Command, tokens: list[str], env: dict[str, str]) -> Ran:
        cmd = self._accelerate_argv(tokens)
        cmd[0] = str(Path(sys.executable).parent / "accelerate")
        proc = subprocess.run(
            cmd, cwd=self.root, env=child_env(self.root, env), capture_output=True, text=True, timeout=300
        )
        return Ran(step, shlex.join(cmd), proc.returncode, proc.stdout + proc.stderr)

    def _bash(self, step: Command, text: str) -> Ran:
        proc = subprocess.run(
            ["bash", "-c", text],
            cwd=self.root,
            env=child_env(self.root),
            capture_output=True,
            text=True,
            timeout=300,
        )
        return Ran(step, f"bash -c {shlex.quote(text)}", proc.returncode, proc.stdout + proc.stderr)
