"""Errors a user reads: one line that says what happened and what to do, and the exit codes.

Exit codes of every `moe-lm` command (`moe-lm launch` returns the failing process's):
  0      done (also a stop signal that saved a checkpoint)
  1      a crash: an unexpected exception, shown with its traceback
  2      bad input (config, data, checkpoint, flags): `UserError`, one line
  3      the run stopped for a reason outside its input: a process it depends on died, or a wait
         on another process ran past `parallel.timeout`: `RunError`, one line
  128+N  killed by signal N (137 = SIGKILL, e.g. by the kernel's out-of-memory killer)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

# Set by `moe-lm launch` for its workers: each leaves a report of how it failed here (rankN.json)
# instead of printing it, and the launching process prints the cause once for all ranks
# (moe_lm/cli/launch.py).
ERROR_DIR_ENV = "MOE_LM_ERROR_DIR"


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, flags). Printed as one line, exit code 2."""

    exit_code = 2
    consequence = False  # True: raised only because another process failed first


class ConfigError(UserError):
    """A config key is unknown, mistyped or impossible."""


class RunError(Exception):
    """The run cannot go on, though its input is fine: a worker process died, a wait on another
    process timed out. One line, exit code 3; `train.resume=auto` continues once the cause is gone."""

    exit_code = 3
    consequence = False


class PeerFailed(RunError):
    """This process stops because another one failed first: that one's error is the cause."""

    consequence = True


class WaitTimeout(RunError):
    """Another process did not arrive within `parallel.timeout` seconds: names it and the wait."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse prints usage plus an error (two lines) and exits; our CLI contract is one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; run `{self.prog} --help` for usage")


def write_report(kind: str, line: str, exit_code: int, *, consequence: bool, traceback: str = "") -> bool:
    """Under `moe-lm launch`: leave this process's failure for the launching process (JSON, one file
    per rank). False when not launched that way (the caller prints it itself)."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if not error_dir:
        return False
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "rank": rank,
        "kind": kind,  # "user", "run" or "crash"
        "consequence": consequence,
        "line": line,
        "traceback": traceback,
        "exit_code": exit_code,
        "time": time.time(),
    }
    path = Path(error_dir, f"rank{rank}.json")
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(record) + "\n")
        tmp.rename(path)  # the launcher never reads half a report
    except OSError:  # the launcher is gone (its directory with it): say it here instead
        return False
    return True


def write_exit(code: int) -> None:
    """Under `moe-lm launch`: this process ends by itself with `code` (rankN.exit). A launcher stopped
    by SIGTERM or Ctrl-C passes the signal on and then tells a process that stopped cleanly (it saved
    a checkpoint) from one that was killed, which leaves nothing."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if not error_dir:
        return
    rank = int(os.environ.get("RANK", "0"))
    with contextlib.suppress(OSError):  # the launcher is gone: no one asks
        Path(error_dir, f"rank{rank}.exit").write_text(f"{code}\n")


def report(e: UserError | RunError) -> int:
    """Print an error as the one line the CLI promises (stderr) and return its exit code."""
    line = f"error: {e}"
    kind = "user" if isinstance(e, UserError) else "run"
    if not write_report(kind, line, e.exit_code, consequence=e.consequence):
        print(line, file=sys.stderr)
    return e.exit_code
