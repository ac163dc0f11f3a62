"""User-facing errors: one line that says what is wrong and how to fix it; the CLI exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, flags). Printed as one line, exit code 2."""


class ConfigError(UserError):
    """A config key is unknown, mistyped or impossible."""
