"""Filesystem helpers shared by the writers of whole directories (tokenizer, export, import), and the
one error every writer raises when the disk is full."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------------------------
# A full disk. Writers of checkpoints, the token store and metrics.jsonl turn ENOSPC / EDQUOT into
# one line saying what could not be written, how much it needed and how much is free; whoever
# knows the run (the trainer) adds what survived and how to continue.

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# safetensors (Rust) and torch.save report a full disk in their own exception types
_FULL_MARKERS = ("No space left", "StorageFull", "os error 28", "Disk quota", "os error 122")


class DiskFullError(UserError):
    """A write failed because the filesystem (or the quota) is full. One line, exit code 2: the
    operator frees space and runs the same command again."""


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return True
    return not isinstance(e, UserError) and any(marker in str(e) for marker in _FULL_MARKERS)


def free_bytes(path: str | Path) -> int:
    """Bytes free to this user on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 0


def human_bytes(n: int) -> str:
    """54,525,952 -> '52.0 MiB (54,525,952 bytes)': readable, and exact for whoever compares."""
    size, unit = float(n), "bytes"
    for name in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, name
    return f"{n:,} bytes" if unit == "bytes" else f"{size:.1f} {unit} ({n:,} bytes)"


def _existing(path: str | Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _why_full(path: str | Path, needed: int, free: int, cause: BaseException | None) -> str:
    """What the free bytes alone would hide: a quota, no inodes left, or room that is there now."""
    if (isinstance(cause, OSError) and cause.errno == errno.EDQUOT) or "quota" in str(cause or "").lower():
        return "; the disk quota is exhausted, so the free space is not this user's to use: free space under the quota"
    try:
        st = os.statvfs(_existing(path))
        if st.f_files and st.f_favail == 0:
            return f"; but no inodes are left (the filesystem holds {st.f_files:,} files): delete files, not just bytes"
    except OSError:
        pass
    if free >= needed:
        return (
            "; there is room now, so the disk filled while writing (another writer) or the rest is reserved"
        )
    return ""


def disk_full(
    what: str, path: str | Path, needed: int, qualifier: str = "", cause: BaseException | None = None
) -> DiskFullError:
    """`what` (e.g. "checkpoint step-20") could not be written to `path`: the one-line error.
    `qualifier` says how exact `needed` is ("about", "at least"); `cause` (the OSError) tells a
    quota from a full disk."""
    needs = f"{qualifier} {human_bytes(needed)}".strip()
    free = free_bytes(path)
    return DiskFullError(
        f"disk full: cannot write {what} to {path}: it needs {needs} and {human_bytes(free)} are free"
        + _why_full(path, needed, free, cause)
    )


def append_bytes(fd_file: Any, data: bytes) -> None:
    """Write all of `data` to an unbuffered binary file: raw writes may stop short, and nothing may
    stay behind in a buffer to fail again when the file is closed."""
    view = memoryview(data)
    while view:
        written = fd_file.write(view)
        view = view[written or 0 :]
