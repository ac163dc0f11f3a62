"""Filesystem helpers shared by the writers of whole directories (tokenizer, export, import)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from moe_lm.errors import UserError


def replace_dir(tmp: Path, out: Path) -> None:
    """Put a fully written `tmp` at `out`, replacing what was there: the old directory is moved
    aside first and deleted only after the rename, so `out` is never half-written."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(
    out: str | Path, overwrite: bool, replaceable: Callable[[Path], bool], flag: str
) -> Iterator[Path]:
    """Yield a temp dir that becomes `out` on success; refuse a non-empty `out` that is not ours."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' is a file; choose a directory for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not replaceable(out):
        raise UserError(
            f"'{out}' is not empty and was not written by this command; choose another --out or pass {flag}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_permissions(root: Path) -> None:
    """mkdtemp makes the dir private (0700) and some writers make files 0600; give the result the
    permissions of a directory made with mkdir under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
