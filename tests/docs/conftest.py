"""One tiny `make train` run shared by every docs test, and each markdown file's commands run once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.docs.commands import DocRun, build_template, run_doc


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs-template")
    build_template(root)
    return root


@pytest.fixture(scope="session")
def doc_run(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], DocRun]:
    """Runs a markdown file's steps once per session; a failed run fails every test that asks for it."""
    done: dict[Path, DocRun | BaseException] = {}
    workdir = tmp_path_factory.mktemp("docs-runs")

    def get(path: Path) -> DocRun:
        if path not in done:
            try:
                done[path] = run_doc(path, template, workdir)
            except AssertionError as e:
                done[path] = e
        result = done[path]
        if isinstance(result, BaseException):
            raise result
        return result

    return get
