"""Text files → documents, streamed in batches: text, JSON Lines / JSON, parquet, optionally compressed.

Formats by extension; any other extension (source code, logs) is plain text when the file reads as
UTF-8. Documents: each JSON record and each parquet row is one document (its `text_field`); a plain-text
file is ONE document whose lines are read (and tokenised) one by one, so memory stays bounded; the
tokenizer never merges across a newline, so the ids equal those of the whole text.

Big uncompressed text and JSON Lines files are cut into pieces of about `PIECE_BYTES` at line
boundaries, big parquet files into runs of whole row groups of about as many compressed bytes: a
piece is the unit of parallel tokenising and of one store shard. Errors name the file
and the setting to change, on one line (UserError).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from moe_lm.errors import UserError

if TYPE_CHECKING:
    from moe_lm.data.chat import ChatSpec

_EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
}
_OPENERS: dict[str, Any] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_SNIFF_BYTES = 1 << 16
PIECE_BYTES = 64 << 20  # input bytes per piece/shard: parallel grain vs number of files in the store
BATCH_BYTES = 1 << 20  # text handed to the tokenizer at a time


def resolve_files(patterns: list[str], key: str) -> list[Path]:
    """Expand paths and globs (`**` allowed) in order, each glob sorted; `key` names the setting in errors."""
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"{key}: no file matches '{pattern}'; check the path or the glob")
            files.extend(matches)
            continue
        path = Path(pattern)
        if path.is_dir():
            raise UserError(
                f"{key}: '{pattern}' is a directory; list its files or use a glob like '{pattern}/*.txt'"
            )
        if not path.is_file():
            raise UserError(f"{key}: file '{pattern}' not found; check the path (relative to {Path.cwd()})")
        files.append(path)
    return list(dict.fromkeys(files))  # a file listed twice (e.g. by two globs) is read once


def setting(key: str, name: str) -> str:
    """How to change setting `name` near `key`: a flag (--format), data.format, or the source's own key."""
    if key.startswith("--"):
        return f"--{name.replace('_', '-')}"
    if key.startswith("data.sources.") or key.startswith("data.val_sources."):
        return key.rsplit(".", 1)[0] + "." + name
    return f"data.{name}"


def _compression(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".zst":
        raise UserError(f"'{path}': zstd files need the zstandard package; decompress it or use .gz/.xz")
    return suffix if suffix in _OPENERS else None


def file_format(path: Path, fmt: str, key: str) -> str:
    """`fmt` unless it is "auto"; then text/json/parquet by extension (after any .gz/.bz2/.xz)."""
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    for ext in (*_OPENERS, ".zst"):
        name = name.removesuffix(ext)
    found = _EXTENSIONS.get(Path(name).suffix)
    if found is None:
        # Source code (.py, .rs, ...), logs, extension-less files: text, if they read as UTF-8.
        if _looks_like_text(path):
            return "text"
        raise UserError(
            f"{key}: '{path}' has an extension that is not .txt/.jsonl/.json/.parquet and is not UTF-8 "
            f"text; set {setting(key, 'format')} to text, json or parquet if it is one of them"
        )
    return found


def _looks_like_text(path: Path) -> bool:
    """The first 64 KiB decode as UTF-8 (a character cut at the end is allowed) and hold no NUL."""
    try:
        with _open(path) as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and len(head) == _SNIFF_BYTES
    return True


def _open(path: Path) -> IO[bytes]:
    comp = _compression(path)
    return _OPENERS[comp](path, "rb") if comp else path.open("rb")  # type: ignore[no-any-return]


@dataclass(frozen=True)
class FilePiece:
    """Bytes [start, end) of a file (the whole file when compressed or not line-oriented); for a
    parquet file cut into pieces, its row groups [a, b) and their share of the file's bytes."""

    path: str
    fmt: str  # text | json | parquet
    text_field: str
    key: str  # the setting that listed the file, for messages
    start: int
    end: int
    last: bool  # the piece that ends the file (a text file's single document ends here)
    row_groups: tuple[int, int] | None = None  # parquet only, when the file is cut; None: all of them
    chat: ChatSpec | None = None  # records are conversations (moe_lm/data/chat.py), not text_field


def _line_starts(path: Path, size: int) -> list[int]:
    """Offsets cutting the file into pieces of about PIECE_BYTES, each just after a newline."""
    cuts = [0]
    with path.open("rb") as f:
        while cuts[-1] + PIECE_BYTES < size:
            f.seek(cuts[-1] + PIECE_BYTES)
            f.readline()  # to the end of the line in progress
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    return [*cuts, size]


def check_file(path: Path, fmt: str, text_field: str, key: str, chat: ChatSpec | None = None) -> None:
    """Cheap checks before tokenising (binary text, parquet schema), so errors come early."""
    if chat is not None and fmt == "text":
        raise UserError(
            f"{key}: '{path}' is plain text, but chat data are records (JSON Lines, JSON or parquet) with a "
            f"'{chat.messages_field}' list or 'prompt'/'response' fields; convert it, or set {setting(key, 'format')}"
        )
    if fmt == "text" and not _compression(path):
        with path.open("rb") as f:
            if b"\0" in f.read(_SNIFF_BYTES):
                raise UserError(
                    f"{key}: '{path}' is binary (NUL bytes), not text; list only UTF-8 text files"
                )
    if fmt == "parquet":
        if _compression(path):
            raise UserError(f"{key}: '{path}': compressed parquet is not supported; decompress it")
        import pyarrow.parquet as pq

        try:
            schema = pq.ParquetFile(path).schema_arrow
        except Exception as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{key}: '{path}' is not a parquet file ({detail}); fix it or set {setting(key, 'format')}"
            ) from None
        if chat is not None:
            chat.check_columns(schema.names, f"{key}: '{path}'")
            return
        if text_field not in schema.names:
            raise UserError(
                f"{key}: '{path}' has no field '{text_field}' (fields: {', '.join(schema.names)}); "
                f"set {setting(key, 'text_field')} to the field holding the text"
            )
        kind = str(schema.field(text_field).type)
        if kind not in ("string", "large_string"):
            raise UserError(
                f"{key}: field '{text_field}' of '{path}' holds {kind}, not text; "
                f"set {setting(key, 'text_field')} to a text field"
            )


def _row_group_runs(path: Path, size: int) -> list[tuple[int, int, int, int]]:
    """(first row group, end row group, start byte, end byte) of runs of about PIECE_BYTES compressed
    bytes (one run for a file of a single row group). Bytes are where the run's share of the file
    would start and end (for progress), not exact offsets."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    sizes = [
        sum(meta.row_group(g).column(c).total_compressed_size for c in range(meta.num_columns))
        for g in range(meta.num_row_groups)
    ]
    runs, first, start, acc = [], 0, 0, 0
    for g, n in enumerate(sizes):
        acc += n
        if acc - start >= PIECE_BYTES and g + 1 < len(sizes):
            runs.append((first, g + 1, start, acc))
            first, start = g + 1, acc
    return [*runs, (first, len(sizes), start, size)]


def file_pieces(
    path: Path, fmt: str, text_field: str, key: str, chat: ChatSpec | None = None
) -> list[FilePiece]:
    size = path.stat().st_size
    if fmt == "parquet" and size > PIECE_BYTES:  # smaller files are one piece: no footer read here
        runs = _row_group_runs(path, size)
        if len(runs) > 1:
            return [
                FilePiece(str(path), fmt, text_field, key, a, b, i == len(runs) - 1, (first, end), chat)
                for i, (first, end, a, b) in enumerate(runs)
            ]
    splittable = fmt in ("text", "json") and not _compression(path) and not _is_json_array(path, fmt)
    cuts = _line_starts(path, size) if splittable else [0, size]
    return [
        FilePiece(str(path), fmt, text_field, key, a, b, i == len(cuts) - 2, chat=chat)
        for i, (a, b) in enumerate(zip(cuts, cuts[1:]))
    ]


def _is_json_array(path: Path, fmt: str) -> bool:
    if fmt != "json":
        return False
    with _open(path) as f:
        head = f.read(_SNIFF_BYTES).lstrip()
    return head.startswith(b"[")


# ---------------------------------------------------------------------------------------------
# Reading a piece: batches of (texts, input bytes consumed)


def _lines(piece: FilePiece) -> Iterator[tuple[list[bytes], int, int]]:
    """Batches of raw lines of the piece: (lines, offset of the first, bytes)."""
    path = Path(piece.path)
    with _open(path) as f:
        if piece.start:
            f.seek(piece.start)
        pos = piece.start
        limit = piece.end if not _compression(path) else None
        batch: list[bytes] = []
        first, size = pos, 0
        for line in f:
            batch.append(line)
            size += len(line)
            if size >= BATCH_BYTES:
                yield batch, first, size
                first, batch, size = first + size, [], 0
            if limit is not None and first + size >= limit:
                break
        if batch:
            yield batch, first, size


def _decode(line: bytes, offset: int, piece: FilePiece) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{piece.key}: '{piece.path}' is not UTF-8 text (byte {offset + e.start}: {e.reason}); "
            "convert it to UTF-8"
        ) from None


def _bad_json(piece: FilePiece, detail: str) -> UserError:
    return UserError(
        f"{piece.key}: cannot read '{piece.path}' as JSON or JSON Lines ({detail}); "
        f"fix the file or set {setting(piece.key, 'format')}"
    )


def _field(record: Any, piece: FilePiece, where: str) -> Any:
    if piece.chat is not None:  # a conversation (a Conversation, not a str)
        return piece.chat.conversation(record, f"{piece.key}: {where} of '{piece.path}'")
    if not isinstance(record, dict):
        raise _bad_json(piece, f"{where} is not an object")
    if piece.text_field not in record:
        raise UserError(
            f"{piece.key}: '{piece.path}' has no field '{piece.text_field}' ({where} has fields: "
            f"{', '.join(map(str, record))}); set {setting(piece.key, 'text_field')} to the field holding the text"
        )
    value = record[piece.text_field]
    if value is None:
        return ""  # null counts as an empty document
    if not isinstance(value, str):
        raise UserError(
            f"{piece.key}: field '{piece.text_field}' of '{piece.path}' holds {type(value).__name__} "
            f"({where}), not text; set {setting(piece.key, 'text_field')} to a text field"
        )
    return value


def _json_lines(piece: FilePiece) -> Iterator[tuple[list[str], int]]:
    for lines, offset, size in _lines(piece):
        texts = []
        for line in lines:
            text = _decode(line, offset, piece)
            offset += len(line)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise _bad_json(piece, f"at byte {offset - len(line) + e.pos}: {e.msg}") from None
            texts.append(_field(record, piece, f"the record at byte {offset - len(line)}"))
        yield texts, size


def _json_array(piece: FilePiece) -> Iterator[tuple[list[str], int]]:
    # A JSON array is parsed whole (the json module cannot stream); use JSON Lines for big files.
    with _open(Path(piece.path)) as f:
        raw = f.read()
    try:
        records = json.loads(_decode(raw, 0, piece))
    except json.JSONDecodeError as e:
        raise _bad_json(piece, f"at byte {e.pos}: {e.msg}") from None
    if not isinstance(records, list):
        raise _bad_json(piece, "the top level is not a list of records")
    for i in range(0, len(records), 1000):
        yield [_field(r, piece, f"record {i + j}") for j, r in enumerate(records[i : i + 1000])], 0
    yield [], len(raw)


def _parquet(piece: FilePiece) -> Iterator[tuple[list[str], int]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    groups = list(range(*(piece.row_groups or (0, pf.metadata.num_row_groups))))
    rows = max(sum(pf.metadata.row_group(g).num_rows for g in groups), 1)
    size = piece.end - piece.start
    chat = piece.chat
    columns = [piece.text_field] if chat is None else chat.columns(pf.schema_arrow.names)
    done = 0
    for batch in pf.iter_batches(batch_size=1000, columns=columns, row_groups=groups):
        if chat is None:
            texts = [t or "" for t in batch.column(0).to_pylist()]
        else:
            texts = [_field(r, piece, f"row {done + i}") for i, r in enumerate(batch.to_pylist())]
        done += len(texts)
        yield texts, size * len(texts) // rows


def read_piece(piece: FilePiece) -> Iterator[tuple[list[Any], bool, int]]:
    """Batches of (texts, texts_are_documents, input bytes consumed).

    For text files the texts are lines of one document (the caller appends EOS after the last
    piece); otherwise each text is a document (empty ones are skipped by the caller).
    """
    if piece.fmt == "text":
        for lines, offset, size in _lines(piece):
            texts = []
            for line in lines:
                texts.append(_decode(line, offset, piece))
                offset += len(line)
            yield texts, False, size
    elif piece.fmt == "parquet":
        for texts, size in _parquet(piece):
            yield texts, True, size
    elif _is_json_array(Path(piece.path), "json"):
        for texts, size in _json_array(piece):
            yield texts, True, size
    else:
        for texts, size in _json_lines(piece):
            yield texts, True, size


def iter_texts(path: Path, fmt: str, text_field: str, key: str) -> Iterator[str]:
    """The text of a file in pieces (lines of a text file, documents of JSON/parquet), for tokenizer
    training. The file is checked now, not when iterated, so errors surface here as UserError."""
    if path.stat().st_size == 0:
        raise UserError(f"{key}: '{path}' is empty; remove it from {key} or add text")
    check_file(path, fmt, text_field, key)
    return (
        t
        for piece in file_pieces(path, fmt, text_field, key)
        for ts, _, _ in read_piece(piece)
        for t in ts
        if t
    )


__all__ = [
    "FilePiece",
    "check_file",
    "file_format",
    "file_pieces",
    "iter_texts",
    "read_piece",
    "resolve_files",
    "setting",
]
