"""Filesystem helpers shared by the writers of whole directories (tokenizer, export)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: Path, out: Path) -> None:
    """Put a fully written `tmp` at `out`, replacing what was there: the old directory is moved
    aside first and deleted only after the rename, so `out` is never half-written."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
