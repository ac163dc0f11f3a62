"""`make lint` lints and formats every Python file of the folders it names: ruff's default exclude
list holds `dist`, which would drop tests/dist/ (the 2-process tests) without a word."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUFF = Path(sys.executable).parent / "ruff"
pytestmark = pytest.mark.skipif(not RUFF.is_file(), reason="ruff is a [dev] extra")


def _lint_folders() -> list[str]:
    """The folders of the Makefile's `ruff check` line, so this follows `make lint`."""
    m = re.search(r"ruff check (?P<folders>[^\n]+)", (REPO / "Makefile").read_text())
    assert m, "no `ruff check` line in the Makefile"
    return m.group("folders").split()


def _python_files(folders: list[str]) -> set[Path]:
    found = {p for folder in folders for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert any(p.is_relative_to(REPO / "tests" / "dist") for p in found)
    return found


def _ruff(*args: str) -> str:
    proc = subprocess.run([str(RUFF), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def test_ruff_check_sees_every_python_file_make_lint_names() -> None:
    folders = _lint_folders()
    seen = {Path(line) for line in _ruff("check", "--show-files", *folders).splitlines()}
    missing = sorted(str(p.relative_to(REPO)) for p in _python_files(folders) - seen)
    assert missing == []


def test_ruff_format_sees_every_python_file_make_lint_names() -> None:
    folders = _lint_folders()
    # `ruff format --check` names only the files it would change; its summary counts all it read.
    out = _ruff("format", "--check", *folders)
    counts = re.findall(r"(\d+) files? (?:would be reformatted|already formatted)", out)
    assert sum(map(int, counts)) == len(_python_files(folders)), out
