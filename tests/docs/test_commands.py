"""Every shell command in README.md and docs/*.md runs at tiny size (or, where marked as not run,
parses); the rules are in tests/docs/commands.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.docs.commands import DocRun
from tests.docs.markdown import Command, doc_files, rel, steps

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("doc", doc_files(), ids=rel)
def test_every_command_of_the_file_runs_or_parses(doc: Path, doc_run: Callable[[Path], DocRun]) -> None:
    run = doc_run(doc)
    commands = [s for s in steps(doc) if isinstance(s, Command)]
    assert len([r for r in run.steps if isinstance(r.step, Command)]) == len(commands)
