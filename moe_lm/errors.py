"""User-facing errors: one line that says what is wrong and how to fix it; the CLI exits 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


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
    print(f"error: {e}", file=sys.stderr)
    return 2
