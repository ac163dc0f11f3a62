"""User-facing errors: one line that says what is wrong and how to fix it; the CLI exits 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

# Set by `moe-lm launch` for its workers: they leave their error line here (rankN.error) instead
# of printing it, and the launching process prints it once for all ranks (moe_lm/cli/launch.py).
ERROR_DIR_ENV = "MOE_LM_ERROR_DIR"


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, flags). Printed as one line, exit code 2."""


class ConfigError(UserError):
    """A config key is unknown, mistyped or impossible."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse prints usage plus an error (two lines) and exits; our CLI contract is one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; run `{self.prog} --help` for usage")


def report(e: UserError) -> int:
    """Print a user error as the one line the CLI promises (stderr) and return its exit code, 2."""
    line = f"error: {e}"
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir:
        Path(error_dir, f"rank{os.environ.get('RANK', '0')}.error").write_text(line + "\n")
    else:
        print(line, file=sys.stderr)
    return 2
