"""A checkpoint's MANIFEST.json: size and sha256 of every other file, written last.

A directory is a complete checkpoint only if its manifest exists and every file matches it, so a
write or a delete that was killed midway is never mistaken for a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    with open(directory / MANIFEST, "w") as out:
        out.write(json.dumps({"files": files}, indent=1))
        out.flush()
        os.fsync(out.fileno())  # the manifest vouches for the rest: it must reach the disk before the rename


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (the write did not finish)"
    try:
        files = {
            str(name): (int(meta["size"]), str(meta["sha256"]))
            for name, meta in json.loads(manifest.read_text())["files"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    # Sizes first: a truncated file is found without hashing gigabytes.
    for name, (size, _) in files.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size} (truncated)"
    for name, (_, digest) in files.items():
        if _sha256(directory / name) != digest:
            return f"{name} does not match its checksum (corrupted)"
    return None
