"""Training data: files → documents → token ids (+EOS per document) → packed blocks, cached on disk.

Documents: each JSON/JSONL record and each parquet row is one document (the `data.text_field`
field). A plain-text file is ONE document: its lines are tokenised separately (memory stays
bounded for big files) but no piece contains a newline, so the ids equal those of the whole text
and the file round-trips exactly; corpora with one document per line belong in JSONL.

The documents of all files, in the order given, each followed by EOS, form one token stream that is
cut into non-overlapping blocks of `seq_len + 1` tokens (inputs = block[:-1], labels = block[1:]);
the tail shorter than a block is dropped. Validation is `data.val_files` packed the same way, or
else the last `data.val_fraction` of the train blocks (at least one).

The packed blocks are cached under `data.cache_dir` keyed by the files (path, size, mtime), the
tokenizer model bytes and seq_len, so a second run reads them without touching the text. Only one
process builds the cache (see `load_blocks`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from moe_lm.errors import UserError

if TYPE_CHECKING:
    import datasets

    from moe_lm.config import Config
    from moe_lm.data.tokenizer import Tokenizer

# Bump when the cache layout or tokenisation rules change, so stale caches are not read.
CACHE_VERSION = 1
_EXTENSIONS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")  # datasets decompresses these on the fly
_SNIFF_BYTES = 1 << 16


# ---------------------------------------------------------------------------------------------
# Files


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


def _setting(key: str, name: str) -> str:
    """How to change setting `name` where `key` came from: a command-line flag or a config key."""
    return f"--{name.replace('_', '-')}" if key.startswith("--") else f"data.{name}"


def file_format(path: Path, fmt: str, key: str) -> str:
    """`fmt` unless it is "auto"; then text/json/parquet by extension (after any .gz/.zst/...)."""
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    for ext in _COMPRESSION:
        name = name.removesuffix(ext)
    found = _EXTENSIONS.get(Path(name).suffix)
    if found is None:
        raise UserError(
            f"{key}: cannot tell the format of '{path}' from its extension; "
            f"set {_setting(key, 'format')} to text, json or parquet (or rename it to .txt/.jsonl/.parquet)"
        )
    return found


def _innermost(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return e


def _load_file(path: Path, fmt: str, text_field: str, key: str, cache_dir: Path | None) -> datasets.Dataset:
    """One file as a dataset with a single string column "text"; bad files raise a one-line UserError."""
    import datasets

    # datasets' own bars would interleave with a one-line error on stderr; we print a line per stage.
    datasets.disable_progress_bars()

    compressed = path.name.lower().endswith(_COMPRESSION)
    if path.stat().st_size == 0:
        raise UserError(f"{key}: '{path}' is empty; remove it from {key} or add text")
    if fmt == "text" and not compressed:
        with path.open("rb") as f:
            if b"\0" in f.read(_SNIFF_BYTES):
                raise UserError(
                    f"{key}: '{path}' is binary (NUL bytes), not text; list only UTF-8 text files"
                )
    if fmt == "parquet" and not compressed:
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:
            raise UserError(
                f"{key}: '{path}' is not a parquet file ({e}); fix it or set {_setting(key, 'format')}"
            ) from None
        if rows == 0:
            raise UserError(f"{key}: '{path}' has no rows; remove it from {key}")

    kwargs: dict[str, Any] = {"sample_by": "line", "keep_linebreaks": True} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(
            fmt,
            data_files=str(path),
            split="train",
            cache_dir=str(cache_dir) if cache_dir else None,
            **kwargs,
        )
    except Exception as e:  # the builders wrap parse errors; report the root cause on one line
        root = _innermost(e)
        if isinstance(root, UnicodeDecodeError):
            raise UserError(
                f"{key}: '{path}' is not UTF-8 text (byte {root.start}: {root.reason}); convert it to UTF-8"
            ) from None
        what = {"text": "UTF-8 text", "json": "JSON or JSON Lines", "parquet": "parquet"}[fmt]
        detail = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise UserError(
            f"{key}: cannot read '{path}' as {what} ({detail}); fix the file or set {_setting(key, 'format')}"
        ) from None
    assert isinstance(ds, datasets.Dataset)
    if fmt == "text":
        return ds
    if text_field not in ds.column_names:
        raise UserError(
            f"{key}: '{path}' has no field '{text_field}' (fields: {', '.join(ds.column_names)}); "
            f"set {_setting(key, 'text_field')} to the field holding the text"
        )
    feature = ds.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(
            f"{key}: field '{text_field}' of '{path}' holds {feature}, not text; "
            f"set {_setting(key, 'text_field')} to a text field"
        )
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def iter_texts(
    path: Path, fmt: str, text_field: str, key: str, cache_dir: Path | None = None
) -> Iterator[str]:
    """The text of a file in pieces (lines of a text file, documents of JSON/parquet), for tokenizer
    training. The file is opened and checked now, not when iterated, so errors surface as UserError
    here rather than inside sentencepiece's trainer."""
    ds = _load_file(path, fmt, text_field, key, cache_dir)
    return (t for batch in ds.iter(batch_size=1000) for t in batch["text"] if t)


# ---------------------------------------------------------------------------------------------
# Tokenising and packing


class _Encode:
    """datasets.map function: ids per row, plus EOS per row when rows are documents."""

    def __init__(self, tokenizer: Tokenizer, eos_per_row: bool) -> None:
        self.tokenizer = tokenizer
        self.eos_per_row = eos_per_row

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        texts = [t or "" for t in batch["text"]]  # null JSON values count as empty documents
        ids = self.tokenizer.encode_batch(texts)
        if self.eos_per_row:
            eos = self.tokenizer.eos_id
            ids = [row + [eos] if text else [] for row, text in zip(ids, texts)]
        return {"ids": ids}


def _tokenize_file(
    path: Path, fmt: str, text_field: str, key: str, tokenizer: Tokenizer, cache: Path, num_proc: int
) -> np.ndarray:
    import datasets
    import pyarrow.compute as pc

    ds = _load_file(path, fmt, text_field, key, cache)
    is_text = fmt == "text"
    # An explicit fingerprint: datasets would otherwise hash the tokenizer object to key its cache.
    fingerprint = hashlib.sha256(
        f"{ds._fingerprint}|{tokenizer.fingerprint}|{not is_text}|{CACHE_VERSION}".encode()
    ).hexdigest()[:16]
    mapped = ds.map(
        _Encode(tokenizer, eos_per_row=not is_text),
        batched=True,
        batch_size=1000,
        remove_columns=ds.column_names,
        features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
        new_fingerprint=fingerprint,
        num_proc=num_proc if num_proc > 1 and len(ds) >= 10_000 else None,
        desc=f"tokenising {path.name}",
    )
    ids = pc.list_flatten(mapped.data.column("ids")).to_numpy().astype(np.int32, copy=False)
    if ids.size == 0:
        raise UserError(
            f"{key}: '{path}' has no text in field '{text_field}' (every record is empty or null); "
            f"remove it from {key} or set {_setting(key, 'text_field')}"
        )
    if is_text:  # the whole file is one document
        ids = np.append(ids, np.int32(tokenizer.eos_id))
    return ids


def tokenize_files(files: list[Path], cfg: Config, tokenizer: Tokenizer, key: str) -> np.ndarray:
    """The token stream of `files`: every document's ids followed by EOS, files in order (int32)."""
    cache = Path(cfg.data.cache_dir) / "hf"
    d = cfg.data
    parts = [
        _tokenize_file(p, file_format(p, d.format, key), d.text_field, key, tokenizer, cache, d.num_proc)
        for p in files
    ]
    return np.concatenate(parts)


def pack(tokens: np.ndarray, block_len: int, key: str) -> np.ndarray:
    """Non-overlapping [N, block_len] blocks of the stream; the shorter tail is dropped."""
    n = len(tokens) // block_len
    if n == 0:
        raise UserError(
            f"{key} yields {len(tokens)} tokens, fewer than one block of seq_len+1 = {block_len}; "
            "add data or lower data.seq_len"
        )
    return tokens[: n * block_len].reshape(n, block_len)


def split_blocks(blocks: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last `val_fraction` of the blocks (at least one when val_fraction > 0)."""
    n = len(blocks)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise UserError(
            f"data.train_files yields {n} block(s) of seq_len+1 = {seq_len + 1} tokens, too few to hold out "
            f"data.val_fraction = {val_fraction}; add data, lower data.seq_len or set data.val_files"
        )
    return blocks[: n - n_val], blocks[n - n_val :]


# ---------------------------------------------------------------------------------------------
# The block cache: one entry per list of files (the train files, or the val files), packed whole;
# the val_fraction hold-out is sliced off when loading, so changing it needs no re-tokenising.


def cache_path(cfg: Config, tokenizer: Tokenizer, files: list[Path]) -> Path:
    """The cache entry for the blocks of `files` under this config's tokenizer and packing."""
    d = cfg.data
    material = {
        "version": CACHE_VERSION,
        "files": [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "format": d.format,
        "text_field": d.text_field,
        "tokenizer": tokenizer.fingerprint,
        "seq_len": d.seq_len,
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return Path(d.cache_dir) / f"blocks-{key}"


def _build(cfg: Config, tokenizer: Tokenizer, files: list[Path], key: str, out: Path) -> None:
    block_len = cfg.data.seq_len + 1
    print(f"building data cache {out}: tokenising {len(files)} file(s) of {key}", flush=True)
    blocks = pack(tokenize_files(files, cfg, tokenizer, key), block_len, key)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        np.save(tmp / "blocks.npy", np.ascontiguousarray(blocks))
        meta = {"blocks": len(blocks), "block_len": block_len, "tokenizer": str(tokenizer.path)}
        meta["files"] = [str(p) for p in files]
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            tmp.rename(out)  # atomic: readers see the whole entry or none
        except OSError:
            if not (out / "meta.json").is_file():  # not a concurrent builder that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"data cache {out}: {len(blocks)} blocks of {block_len} tokens", flush=True)


def _cached_blocks(
    cfg: Config,
    tokenizer: Tokenizer,
    patterns: list[str],
    key: str,
    is_main: bool,
    barrier: Callable[[], None] | None,
) -> np.ndarray:
    files = resolve_files(patterns, key)
    out = cache_path(cfg, tokenizer, files)
    try:
        if is_main and not (out / "meta.json").is_file():
            _build(cfg, tokenizer, files, key, out)
    finally:  # reached even when the build fails, so the other processes do not hang
        if barrier is not None:
            barrier()
    if not (out / "meta.json").is_file():
        raise UserError(f"data cache {out} was not built; see the main process's error above")
    return np.load(out / "blocks.npy", mmap_mode="r")


def load_blocks(
    cfg: Config,
    tokenizer: Tokenizer,
    split: Literal["train", "val"],
    *,
    is_main: bool = True,
    barrier: Callable[[], None] | None = None,
) -> torch.Tensor:
    """The packed [N, seq_len+1] int64 blocks of `split`, built and cached on first use.

    With several processes, every one calls this with `barrier` (e.g. torch.distributed.barrier)
    and only the main one (`is_main`; per node if nodes do not share `data.cache_dir`) builds the
    cache; the others read it after the barrier. If the build fails, the main process raises the
    error and the others a pointer to it, instead of hanging.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    d = cfg.data
    if d.val_files:  # two independent entries; the train files are not read for the val split
        patterns, key = (
            (d.train_files, "data.train_files") if split == "train" else (d.val_files, "data.val_files")
        )
        blocks = _cached_blocks(cfg, tokenizer, patterns, key, is_main, barrier)
    else:
        if split == "val" and d.val_fraction == 0:
            raise UserError(
                "the validation split is empty: data.val_fraction = 0 and no data.val_files; "
                "set data.val_fraction > 0 or list data.val_files"
            )
        every = _cached_blocks(cfg, tokenizer, d.train_files, "data.train_files", is_main, barrier)
        train, val = split_blocks(every, d.val_fraction, d.seq_len)
        blocks = train if split == "train" else val
    return torch.from_numpy(blocks.astype(np.int64))


__all__ = [
    "cache_path",
    "file_format",
    "iter_texts",
    "load_blocks",
    "pack",
    "resolve_files",
    "split_blocks",
    "tokenize_files",
]
