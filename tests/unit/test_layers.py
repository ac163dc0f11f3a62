"""The package layering (docs/design.md): checked by import-linter, plus what it cannot express."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_layers_and_no_cycles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The contracts in pyproject.toml ([tool.importlinter]), as `make lint` runs them."""
    cli = pytest.importorskip("importlinter.cli")
    monkeypatch.chdir(REPO)
    assert cli.lint_imports(str(REPO / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names, function-level imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_model_never_imports_torch_distributed() -> None:
    # import-linter sees external packages only whole (torch), so this one is checked here.
    files = sorted((REPO / "moe_lm" / "model").glob("*.py"))
    assert files
    for path in files:
        bad = {
            m
            for m in _imported_modules(path)
            if m.startswith(("torch.distributed", "accelerate", "deepspeed"))
        }
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
    assert "torch.distributed" in _imported_modules(
        REPO / "moe_lm" / "parallel" / "mesh.py"
    )  # the scan sees it
