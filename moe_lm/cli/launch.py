"""`moe-lm launch [accelerate launch options] COMMAND ...`: accelerate's launcher, with our error contract.

`accelerate launch ... -m moe_lm train CONFIG` works, but accelerate turns any failing worker into
its own report: the simple launcher raises `CalledProcessError` (a traceback; `--quiet` swaps it
for a bare exit 1), and the torchrun launcher (multi-process, DeepSpeed) logs each worker's exit
and raises `ChildFailedError` whatever `--quiet` says. Either way the exit code is 1, and an
accelerate config file cannot change that (it has no `quiet` key). Nothing in the launching
process runs our code, so nothing a worker does can make that process exit 2 quietly.

This command runs accelerate's own launch code (same options, same config files) in-process and
keeps the contract of every other `moe-lm` command:
- the config is loaded and checked here first, so a bad key or value is one line before any
  worker starts;
- workers write a user error to a file in `MOE_LM_ERROR_DIR` instead of stderr (and any other
  exception's traceback too), so when a run stops on bad input this process prints that one line
  once, not once per rank, with no peer's "connection closed" traceback and no launcher report,
  and exits 2. A worker that crashed for another reason has its traceback printed and its exit
  code returned.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from moe_lm.errors import ERROR_DIR_ENV, UserError
from moe_lm.libraries import configure_deepspeed

USAGE = (
    "usage: moe-lm launch [accelerate launch options] COMMAND [ARGS...]\n"
    "  e.g. moe-lm launch --config_file configs/accelerate/cpu-2proc.yaml train configs/tiny-shakespeare.yaml "
    "parallel.ep_size=2\n"
    "Takes every option of `accelerate launch` (see `accelerate launch --help`) and runs `moe-lm COMMAND`\n"
    "in each process; a user error is one line on stderr and exit code 2, as for any moe-lm command."
)


def split_argv(argv: list[str], commands: set[str]) -> tuple[list[str], list[str]]:
    """(accelerate options, the moe-lm command and its arguments): split at the first command name."""
    for i, arg in enumerate(argv):
        if arg in commands:
            return argv[:i], argv[i:]
    raise UserError(
        "moe-lm launch: no command to run; put it after accelerate's options, e.g. "
        "`moe-lm launch --config_file configs/accelerate/cpu-2proc.yaml train CONFIG`"
    )


def preflight(command: list[str]) -> None:
    """What the launching process can check without starting workers: the train command's config."""
    if command[0] != "train":
        return
    from moe_lm.cli.train import train_parser
    from moe_lm.config import load_config

    args = train_parser().parse_args(command[1:])
    load_config(args.config, args.overrides)


def accelerate_args(options: list[str], command: list[str]) -> Any:
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()

    def error(message: str) -> None:  # argparse prints usage and exits; we keep to one line
        raise UserError(f"moe-lm launch: {message} (the options are accelerate launch's)")

    parser.error = error  # type: ignore[method-assign,assignment]
    for i, option in enumerate(options):
        if option == "--config_file" and i + 1 < len(options) and not Path(options[i + 1]).is_file():
            raise UserError(f"moe-lm launch: --config_file '{options[i + 1]}' not found")
    return parser.parse_args([*options, "-m", "moe_lm", *command])


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def report_workers(error_dir: Path, rank: int, code: int) -> int:
    """Print what the workers left in `error_dir` and return this command's exit code."""
    lines = sorted(error_dir.glob("rank*.error"), key=lambda p: int(p.stem[4:]))
    if lines:  # bad input: the lowest rank's line (every rank usually has the same one)
        print(lines[0].read_text().strip(), file=sys.stderr)
        return 2
    tracebacks = sorted(error_dir.glob("rank*.traceback"), key=lambda p: int(p.stem[4:]))
    for path in tracebacks:
        print(f"--- {path.stem} ---\n{path.read_text().rstrip()}", file=sys.stderr)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        print(f"error: process {rank} was killed by {name}", file=sys.stderr)
    elif not tracebacks:
        print(f"error: process {rank} exited with code {code}", file=sys.stderr)
    return _exit_code(code)


def launch_main(argv: list[str]) -> int:
    from moe_lm.cli import COMMANDS

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    options, command = split_argv(argv, set(COMMANDS) - {"launch"})
    args = accelerate_args(options, command)
    preflight(command)
    # torchrun's agent logs every worker's exit and closing signal; the workers and this command say
    # what matters. Exceptions it raises still reach us.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    configure_deepspeed()  # accelerate's DeepSpeed launcher imports it; the workers inherit the settings
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    error_dir = Path(tempfile.mkdtemp(prefix="moe-lm-launch-"))
    os.environ[ERROR_DIR_ENV] = str(error_dir)  # the workers inherit it
    try:
        launch_command(args)
        return 0
    except subprocess.CalledProcessError as e:  # the single-process launcher
        return report_workers(error_dir, 0, e.returncode)
    except ChildFailedError as e:  # torchrun's: several processes, DeepSpeed
        rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
        return report_workers(error_dir, rank, int(failure.exitcode))
    except ValueError as e:  # accelerate's own checks of its options, before any worker starts
        raise UserError(f"moe-lm launch: {str(e).splitlines()[0]}") from None
    finally:
        os.environ.pop(ERROR_DIR_ENV, None)
        shutil.rmtree(error_dir, ignore_errors=True)
