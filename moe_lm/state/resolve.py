"""Which checkpoint a path means: `latest`, a run directory, its checkpoints/ or a step-N directory.

Resume, `train.init_from`, eval, generate, export and stats all resolve through here, so they agree
on what counts as complete (a verified manifest) and fall back past damaged checkpoints the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe_lm.errors import UserError
from moe_lm.state.manifest import MANIFEST, verify


def step_dirs(ckpt_root: Path) -> list[Path]:
    """step-N directories, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def scan(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest complete checkpoint or None, the damaged newer ones with what is wrong with each)."""
    damaged: list[tuple[Path, str]] = []
    for candidate in step_dirs(ckpt_root):
        problem = verify(candidate)
        if problem is None:
            return candidate, damaged
        damaged.append((candidate, problem))
    return None, damaged


def find_latest(ckpt_root: Path, warn: bool = True) -> Path | None:
    """Newest complete checkpoint; each damaged newer one is named on stderr with the fallback taken."""
    found, damaged = scan(ckpt_root)
    if warn:
        fallback = f"falling back to {found.name}" if found else "no earlier complete checkpoint"
        for path, problem in damaged:
            print(f"warning: checkpoint {path} is damaged ({problem}); {fallback}", file=sys.stderr)
    return found


def resolve_resume(spec: str, run_dir: Path, key: str | None = "train.resume") -> Path:
    """A verified checkpoint dir from: `latest` (this run's newest complete one), a run directory,
    its checkpoints/ directory, or a checkpoint directory. `key` names the setting in errors
    (train.resume, train.init_from), or None for a command-line argument."""
    what = f"{key}={spec}" if key else f"'{spec}'"
    path = Path(spec)
    root = None
    if key and spec in ("latest", "auto"):
        root = run_dir / "checkpoints"
    elif (path / "checkpoints").is_dir():
        root = path / "checkpoints"
    elif (path / "latest").is_file() or any(path.glob("step-*")):
        root = path
    if root is not None:
        found, damaged = scan(root)
        if found is None:
            if damaged:  # one line: the damage is the reason, and nothing is deleted
                newest, why = damaged[0]
                raise UserError(
                    f"{what} but every checkpoint in {root} is damaged ({newest.name}: {why}); nothing was "
                    "deleted: move them away to start afresh, or point it at an intact copy"
                )
            fix = f"start without {key}" if key else "train longer"
            raise UserError(
                f"{what} but {root} holds no complete checkpoint; {fix} or point it at a checkpoint directory"
            )
        for bad, why in damaged:
            print(
                f"warning: checkpoint {bad} is damaged ({why}); falling back to {found.name}",
                file=sys.stderr,
            )
        return found
    if not path.is_dir():
        raise UserError(
            f"{what}: no such checkpoint directory; use latest, a run directory or a checkpoints/step-N path"
        )
    if not (path / MANIFEST).is_file() and not any(path.glob("model-ep*-of-*.safetensors")):
        raise UserError(
            f"{what}: that directory holds no checkpoint (no {MANIFEST}, no model weights); "
            "use latest, a run directory or a RUN/checkpoints/step-N directory"
        )
    problem = verify(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is not usable: {problem}; resume from an earlier one")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A verified checkpoint directory from a checkpoint dir, or a run / checkpoints dir (its newest
    complete checkpoint, falling back past damaged ones with a warning)."""
    return resolve_resume(str(path), Path(path), key=None)
