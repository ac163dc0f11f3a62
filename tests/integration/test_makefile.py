"""`make test` passes only when pytest passed: a failure fails it, and so does a run that collected no
tests (pytest's exit 5), which proves nothing. A stand-in python records how pytest is called."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(("pytest_exit", "make_exit"), [(0, 0), (1, 2), (5, 2)])
def test_make_test_fails_unless_pytest_passed(tmp_path: Path, pytest_exit: int, make_exit: int) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "argv"}\nexit {pytest_exit}\n')
    python.chmod(0o755)
    stamp = venv / ".installed"
    stamp.touch()  # set up: `-o` below keeps make from re-running the install
    # as a user's shell: under `make test` the inherited MAKELEVEL would turn `make:` into `make[1]:`
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    cmd = ["make", "-s", "-o", str(stamp), "test", f"VENV={venv}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert (tmp_path / "argv").read_text() == "-m pytest -q tests\n"
    assert proc.returncode == make_exit, proc.stderr
    if pytest_exit == 5:
        assert proc.stderr.startswith("error: pytest collected no tests\nmake: *** [Makefile:"), proc.stderr
