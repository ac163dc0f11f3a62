"""When writing a checkpoint fails on some rank: every rank stops, and every rank says why.

A rank that cannot write (full disk, quota, read-only filesystem, a bug) must not leave the others
waiting at a barrier, and the others must not answer with a line of their own that hides the
cause. So after each phase of a checkpoint write the ranks first agree whether anyone failed (one
number, the cheap common case), and only then exchange the failing ranks' one-line reasons, so
that every rank raises the same cause:
- a full disk or another refused write: the same `UserError` line on every rank (the launcher shows
  any one of them), with what was needed, what is free, the checkpoint that is intact and how to
  continue;
- any other exception: the failing rank re-raises it (its traceback), and the others raise
  `PeerWriteError`, whose message names that rank and its exception, marked as a consequence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from moe_lm.errors import UserError
from moe_lm.fsutil import DiskFullError, disk_full, is_disk_full
from moe_lm.state.manifest import MANIFEST

_WIDTH = 1024  # bytes of one rank's reason (longer ones are cut)
CONTINUE = "train.resume=auto"


class Collectives(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...


class PeerWriteError(RuntimeError):
    """This rank stopped because another rank failed to write the checkpoint (a consequence: the
    cause is that rank's own error)."""

    consequence = True  # moe-lm launch shows the failing rank's error instead (moe_lm/parallel/waits.py)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def intact_checkpoint(root: Path) -> str:
    """What survives in `root`, as the error line says it: the checkpoint `latest` names."""
    pointer = root / "latest"
    if pointer.is_file() and (root / pointer.read_text().strip()).is_dir():
        return f"checkpoint {pointer.read_text().strip()} is intact"
    return "no earlier checkpoint exists"


def checkpoint_bytes(root: Path, fallback_params: int) -> tuple[int, bool]:
    """(bytes one checkpoint takes, whether that is an estimate): the size of the newest one on disk
    (same model, same optimizer), else fp32 weights plus AdamW's two moments for every parameter."""
    pointer = root / "latest"
    if pointer.is_file():
        try:
            files = json.loads((root / pointer.read_text().strip() / MANIFEST).read_text())["files"]
            return sum(int(meta["size"]) for meta in files.values()), False
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return 12 * fallback_params, True


def _describe(error: BaseException, name: str, root: Path, size: tuple[int, bool]) -> tuple[str, str]:
    """(kind, one line): "disk" (full), "user" (a refused write or bad input), "crash" (anything else)."""
    if is_disk_full(error):
        full = disk_full(f"checkpoint {name}", root, size[0], "about" if size[1] else "", error)
        return "disk", (
            f"{full}; nothing of {name} was kept and {intact_checkpoint(root)}: free space (or lower "
            f"checkpoint.keep_last) and continue with {CONTINUE}"
        )
    if isinstance(error, UserError):
        return "user", str(error)
    if isinstance(error, OSError):  # read-only filesystem, permissions, I/O error
        return "user", (
            f"cannot write checkpoint {name} in {root}: {error.strerror or error}; {intact_checkpoint(root)}: "
            f"fix the directory and continue with {CONTINUE}"
        )
    return "crash", _first_line(error)


def _exchange(backend: Collectives, mine: str) -> list[tuple[int, str]]:
    """Every rank's line ("" for ranks that did not fail), through one all-reduce of bytes."""
    buf = torch.zeros(backend.world_size, _WIDTH, dtype=torch.int32)
    encoded = mine.encode()[:_WIDTH]
    if encoded:
        buf[backend.rank, : len(encoded)] = torch.tensor(list(encoded), dtype=torch.int32)
    if backend.world_size > 1:
        buf = backend.all_reduce(buf, "sum").cpu()
    rows = []
    for r in range(backend.world_size):
        text = bytes(int(b) for b in buf[r].tolist() if b).decode(errors="replace")
        if text:
            rows.append((r, text))
    return rows


def explain_disk_full(e: DiskFullError, root: Path) -> DiskFullError:
    """A full disk met outside a checkpoint write (token store, metrics.jsonl): add what survived
    and how to continue (a checkpoint write's own error already says both)."""
    if CONTINUE in str(e):
        return e
    return DiskFullError(f"{e}; {intact_checkpoint(root)} in {root}: free space and continue with {CONTINUE}")


def any_failed(backend: Collectives, error: BaseException | None) -> bool:
    flag = torch.tensor([0.0 if error is None else 1.0])
    return bool(float(backend.all_reduce(flag, "sum")[0]))


def raise_for_failure(
    backend: Collectives, error: BaseException | None, name: str, root: Path, size: tuple[int, bool]
) -> None:
    """Call on every rank once any_failed() said some rank failed (and the temp dir is gone)."""
    kind, line = _describe(error, name, root, size) if error is not None else ("", "")
    rows = _exchange(backend, f"{kind}:{line}" if error is not None else "")
    causes = [(r, *text.partition(":")[::2]) for r, text in rows]
    # A full disk first: it is the cause when it comes with other failures (a peer's broken write).
    rank, kind, line = min(causes, key=lambda c: (c[1] != "disk", c[1] != "user", c[0]))
    if kind == "disk":
        raise DiskFullError(line) from None
    if kind == "user":
        raise UserError(line) from None
    if error is not None:  # this rank crashed too: its own traceback is a cause
        raise error
    raise PeerWriteError(
        f"process {rank} failed while writing checkpoint {name} in {root} ({line}); this process stopped "
        f"because of it, see process {rank}'s traceback for the cause; {intact_checkpoint(root)}"
    )


__all__ = [
    "PeerWriteError",
    "any_failed",
    "checkpoint_bytes",
    "explain_disk_full",
    "intact_checkpoint",
    "raise_for_failure",
]
