"""The token store: one shard per piece of input, written so that a killed writer never leaves a
shard that looks complete.

    CACHE_DIR/store/shards/NAME.ids    token ids, flat, uint16 (vocab ≤ 65,536) or uint32
    CACHE_DIR/store/shards/NAME.docs   int64 end offsets of the documents that end in this shard
    CACHE_DIR/store/shards/NAME.mask   chat sources only: uint8 per token, 1 on the assistant's tokens
    CACHE_DIR/store/shards/NAME.json   the shard's manifest: input identity, tokenizer fingerprint,
                                       counts, max id, and for each file its size, mtime and xxh3-128

The `.ids` and `.docs` are written under temporary names and renamed; the manifest is written last
(and removed first when a shard is rebuilt): a shard without one is incomplete and gets rebuilt.
Every document is followed by EOS; a plain-text file is one document (EOS after its last piece).
A chat source's documents are its conversations as the chat template renders them, nothing added.

Checking a shard at load time is cheap (sizes and mtimes against its manifest); a file whose size
differs is damaged, one whose mtime differs is checksummed. `moe-lm data prepare --verify`
checksums everything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from moe_lm import faults
from moe_lm.data.files import FilePiece, read_piece
from moe_lm.data.hf_sources import DatasetPiece, read_rows
from moe_lm.errors import UserError
from moe_lm.fsutil import disk_full, is_disk_full

STORE_VERSION = 1
_WRITER_ID = (
    f"{socket.gethostname()}-{os.getpid()}"  # temporary names unique across the nodes sharing a store
)
Piece = FilePiece | DatasetPiece


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(piece: Piece) -> str:
    """A stable file name: readable stem + digest of what the shard is made of."""
    if isinstance(piece, FilePiece):
        stem = Path(piece.path).name
        material: list[Any] = [
            str(Path(piece.path).resolve()),
            piece.fmt,
            piece.text_field,
            piece.start,
            piece.end,
            piece.last,
        ]
        if piece.row_groups is not None:  # absent for whole files: their shard names stay as they were
            material.append(list(piece.row_groups))
        chat = piece.chat
    else:
        stem = piece.spec.dataset.rstrip("/").rsplit("/", 1)[-1] + f"-{piece.spec.split}"
        material = [piece.fingerprint, piece.spec.text_field, piece.start, piece.end]
        chat = piece.spec.chat
    if chat is not None:  # also absent for text: their names stay as they were
        material.append(["chat", *chat.material()])
    digest = hashlib.sha256(json.dumps(material).encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:60]
    return f"{stem}-{piece.start}-{digest}"


def input_identity(piece: Piece) -> dict[str, Any]:
    """What the shard was made from; a change means the shard is stale."""
    if isinstance(piece, FilePiece):
        st = os.stat(piece.path)
        return {"path": str(Path(piece.path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"dataset": piece.spec.dataset, "fingerprint": piece.fingerprint}


# ---------------------------------------------------------------------------------------------
# Writing (runs in worker processes)


@dataclass(frozen=True)
class ShardJob:
    piece: Piece
    shard_dir: str
    name: str
    identity: dict[str, Any]


def _batches(piece: Piece) -> Iterator[tuple[list[Any], bool, int]]:
    return read_piece(piece) if isinstance(piece, FilePiece) else read_rows(piece)


class _Writer:
    """One output file written under a temporary name, hashed as it goes."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(f"{final.name}.tmp-{_WRITER_ID}")
        self.file = self.tmp.open("wb")
        self.hash = xxhash.xxh3_128()
        self.bytes = 0
        self.pending = 0  # bytes of the write in progress (for a full disk's message)

    def write(self, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr).data  # a buffer: no copy
        self.file.write(data)
        self.hash.update(data)
        self.bytes += arr.nbytes
        self.pending = 0

    def commit(self) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.tmp.rename(self.final)
        return {"bytes": self.bytes, "mtime_ns": self.final.stat().st_mtime_ns, "xxh3": self.hash.hexdigest()}

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails again
            self.file.close()
        self.tmp.unlink(missing_ok=True)


_written = 0  # shards written by this process (for the fault-injection tests)


def _chat_of(piece: Piece) -> Any:
    return piece.chat if isinstance(piece, FilePiece) else piece.spec.chat


def write_shard(job: ShardJob, tokenizer: Any, dtype: np.dtype, progress: Any = None) -> dict[str, Any]:
    """Tokenise `job.piece` batch by batch into the shard's files; returns its manifest."""
    global _written
    shard_dir = Path(job.shard_dir)
    manifest_path = shard_dir / f"{job.name}.json"
    manifest_path.unlink(missing_ok=True)  # from here on the old shard (if any) no longer looks complete
    ids_out, docs_out = _Writer(shard_dir / f"{job.name}.ids"), _Writer(shard_dir / f"{job.name}.docs")
    chat = _chat_of(job.piece)
    mask_out = _Writer(shard_dir / f"{job.name}.mask") if chat is not None else None
    eos = tokenizer.eos_id
    tokens = documents = max_id = 0
    try:
        for texts, are_docs, nbytes in _batches(job.piece):
            if mask_out is not None:
                from moe_lm.data.chat import encode_batch

                ids, lengths, mask = encode_batch(texts, tokenizer, chat)
                ends = tokens + np.cumsum(lengths)
                mask_out.write(mask)
            else:
                ids, ends = _encode_texts(tokenizer, texts, are_docs, tokens, eos)
            if ids.size:
                max_id = max(max_id, int(ids.max()))
                ids_out.pending = ids.size * dtype.itemsize
                faults.hit("shard_write", _written + 1, ids_out.tmp)
                ids_out.write(ids.astype(dtype))
                docs_out.write(ends)
            tokens += int(ids.size)
            documents += int(ends.size)
            if progress is not None:
                progress(nbytes, int(ids.size))
        if isinstance(job.piece, FilePiece) and job.piece.fmt == "text" and job.piece.last:
            # a text file is one document: its EOS comes once, after the last piece
            ids_out.write(np.array([eos], dtype=dtype))
            docs_out.write(np.array([tokens + 1], dtype=np.int64))
            tokens, documents, max_id = tokens + 1, documents + 1, max(max_id, eos)
        files = {"ids": ids_out.commit(), "docs": docs_out.commit()}
        if mask_out is not None:
            files["mask"] = mask_out.commit()
    except BaseException as e:
        for out in (ids_out, docs_out, mask_out):
            if out is not None:
                out.abort()
        if is_disk_full(e):  # the shard's temporaries are gone; finished shards stay
            needed = ids_out.bytes + docs_out.bytes + ids_out.pending + (mask_out.bytes if mask_out else 0)
            raise disk_full(f"token store shard {job.name}", shard_dir, needed, "at least", e) from None
        raise
    _written += 1
    faults.hit("shard", _written)
    manifest = {
        "version": STORE_VERSION,
        "input": job.identity,
        "tokenizer": tokenizer.fingerprint,
        "dtype": dtype.name,
        "tokens": tokens,
        "documents": documents,
        "max_id": max_id,
        "files": files,
    }
    tmp = manifest_path.with_name(f"{manifest_path.name}.tmp-{_WRITER_ID}")
    text = json.dumps(manifest, indent=1) + "\n"
    try:
        tmp.write_text(text)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(f"token store shard {job.name}", shard_dir, len(text), cause=e) from None
        raise
    tmp.rename(manifest_path)  # last: the shard is complete from this moment
    return manifest


def _encode_texts(
    tokenizer: Any, texts: list[str], are_docs: bool, tokens: int, eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, end offsets of the documents that end in them) of a batch of texts; `tokens` is where
    the batch starts in the shard."""
    rows = tokenizer.encode_batch(texts) if texts else []
    if are_docs:
        kept = [r for r, t in zip(rows, texts) if t]  # empty and null records are skipped
        flat = list(itertools.chain.from_iterable(r + [eos] for r in kept))
        ends = tokens + np.cumsum([len(r) + 1 for r in kept], dtype=np.int64)
    else:
        flat = list(itertools.chain.from_iterable(rows))
        ends = np.zeros(0, np.int64)
    return np.asarray(flat, dtype=np.int64), ends


# ---------------------------------------------------------------------------------------------
# Checking (main process)


def file_checksum(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def shard_status(
    shard_dir: Path, name: str, identity: dict[str, Any], tokenizer_fp: str, verify: bool = False
) -> tuple[str, dict[str, Any] | None]:
    """("ok" | "missing" | "stale" | "foreign" | "damaged: why", manifest or None)."""
    path = shard_dir / f"{name}.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return "missing", None
    except (OSError, ValueError):
        return "damaged: unreadable manifest", None
    if manifest.get("version") != STORE_VERSION or manifest.get("input") != identity:
        return "stale", manifest
    if manifest.get("tokenizer") != tokenizer_fp:
        return "foreign", manifest
    for kind, meta in manifest["files"].items():
        file = shard_dir / f"{name}.{kind}"
        try:
            st = file.stat()
        except FileNotFoundError:
            return f"damaged: {file.name} is missing", manifest
        if st.st_size != meta["bytes"]:
            return f"damaged: {file.name} has {st.st_size} bytes, its manifest says {meta['bytes']}", manifest
        if (verify or st.st_mtime_ns != meta["mtime_ns"]) and file_checksum(file) != meta["xxh3"]:
            return f"damaged: {file.name} does not match its checksum", manifest
    return "ok", manifest


def clean_temporaries(shard_dir: Path) -> int:
    """Remove what killed writers left (call while holding the store lock)."""
    leftovers = [p for p in shard_dir.glob("*.tmp-*") if p.is_file()]
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """One preparer per store at a time (other jobs sharing the directory wait here)."""
    store.mkdir(parents=True, exist_ok=True)
    with (store / ".lock").open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing {store}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def foreign_tokenizer_error(store: Path, name: str, manifest: dict[str, Any], tokenizer: Any) -> UserError:
    return UserError(
        f"store shard '{store / 'shards' / name}' was made by another tokenizer "
        f"({manifest.get('tokenizer', '?')[:12]}, data.tokenizer is {tokenizer.fingerprint[:12]}); "
        f"set data.cache_dir to a new directory, or delete {store} to re-tokenise"
    )


__all__ = [
    "ShardJob",
    "clean_temporaries",
    "file_checksum",
    "foreign_tokenizer_error",
    "input_identity",
    "shard_name",
    "shard_status",
    "store_lock",
    "token_dtype",
    "write_shard",
]
