"""Preparing the token store: plan the shards of every source, tokenise the missing ones in
`data.num_proc` worker processes with a progress bar, and say what is there.

A worker that dies (e.g. SIGKILLed by the out-of-memory killer) is an error naming the file it was
tokenising, not a hang (moe_lm/data/pool.py).

Incremental: a shard whose manifest matches its input (path, size, mtime or dataset fingerprint)
and the tokenizer is kept, so re-running after a kill finishes only the missing shards and adding a
file to a source tokenises only that file. Shards are shared between sources listing the same file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_lm.data.files import check_file, file_format, file_pieces, resolve_files, setting
from moe_lm.data.hf_sources import dataset_pieces
from moe_lm.data.pool import tokenise_in_workers
from moe_lm.data.store import (
    Piece,
    ShardJob,
    clean_temporaries,
    foreign_tokenizer_error,
    input_identity,
    shard_name,
    shard_status,
    store_lock,
    token_dtype,
    write_shard,
)
from moe_lm.errors import UserError

if TYPE_CHECKING:
    from moe_lm.config import Config
    from moe_lm.data.sources import SourceSpec
    from moe_lm.data.tokenizer import Tokenizer


def store_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir) / "store"


@dataclass
class PreparedSource:
    """A source's shards in stream order, with their manifests."""

    spec: SourceSpec
    names: list[str]
    manifests: list[dict[str, Any]] = field(default_factory=list)
    empty_files: int = 0

    @property
    def tokens(self) -> int:
        return sum(m["tokens"] for m in self.manifests)

    @property
    def documents(self) -> int:
        return sum(m["documents"] for m in self.manifests)


def chat_template_for(tokenizer: Tokenizer, specs: list[SourceSpec]) -> str:
    """The chat template the specs' chat sources are rendered with ("" when none is chat)."""
    from moe_lm.data.chat import template_of

    return template_of(tokenizer) if any(s.chat for s in specs) else ""


def plan_shards(spec: SourceSpec, template: str = "") -> tuple[list[tuple[str, Piece]], int]:
    """(shard name, piece) in stream order, and the number of empty files skipped. A chat source's
    pieces carry the chat `template` (chat_template_for) they are rendered with."""
    from moe_lm.data.chat import ChatSpec

    pieces: list[Piece] = []
    empty: list[Path] = []
    chat = ChatSpec(spec.messages_field, template) if spec.chat else None
    if spec.dataset is not None:
        pieces += dataset_pieces(dataclasses.replace(spec.dataset, chat=chat))
    else:
        files = resolve_files(list(spec.files), spec.key)
        for path in files:
            if path.stat().st_size == 0:
                empty.append(path)
                continue
            fmt = file_format(path, spec.fmt, spec.key)
            check_file(path, fmt, spec.text_field, spec.key, chat)
            pieces += file_pieces(path, fmt, spec.text_field, spec.key, chat)
        if not pieces:
            first = (
                f"'{empty[0]}' is empty"
                if len(empty) == 1
                else f"all {len(empty)} files are empty ('{empty[0]}', ...)"
            )
            raise UserError(f"{spec.key}: {first}; remove it from {spec.key} or add text")
    return [(shard_name(p), p) for p in pieces], len(empty)


def _no_text(source: PreparedSource) -> UserError:
    spec = source.spec
    if spec.chat:
        return UserError(f"{spec.key}: no conversation in its records; add data or remove the source")
    what = f"field '{spec.text_field}'" if spec.dataset or spec.fmt != "text" else "its files"
    return UserError(
        f"{spec.key}: no text in {what} (every record is empty or null); "
        f"remove the source or set {setting(spec.key, 'text_field')}"
    )


# ---------------------------------------------------------------------------------------------
# Tokenising, with a progress bar


def _tokenise(
    jobs: list[ShardJob],
    tokenizer: Tokenizer,
    num_proc: int,
    total_bytes: int,
    heartbeat: Callable[[], None] | None = None,
) -> dict[str, Any]:
    from tqdm import tqdm

    workers = min(num_proc, len(jobs))
    bar = tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"tokenising {len(jobs)} shard(s), {workers} worker(s)",
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    counts = [0, 0]  # bytes, tokens

    def progress(nbytes: int, ntokens: int) -> None:
        counts[0] += nbytes
        counts[1] += ntokens
        if heartbeat is not None:
            heartbeat()

    def update() -> None:
        bar.n = counts[0]
        bar.set_postfix_str(f"{counts[1] / 1e6:.1f}M tokens", refresh=True)
        if heartbeat is not None:
            heartbeat()

    try:
        if workers > 1:
            return tokenise_in_workers(
                jobs, tokenizer.model_bytes, tokenizer.vocab_size, workers, progress, update
            )
        results: dict[str, Any] = {}
        dtype = token_dtype(tokenizer.vocab_size)
        for job in jobs:
            results[job.name] = write_shard(job, tokenizer, dtype, progress)
            update()
        return results
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# The entry point


def prepare_sources(
    cfg: Config,
    tokenizer: Tokenizer,
    specs: list[SourceSpec],
    *,
    rebuild_damaged: bool = False,
    verify: bool = False,
    heartbeat: Callable[[], None] | None = None,
) -> list[PreparedSource]:
    """Make sure the store holds every shard of `specs`; returns them in order.

    A damaged shard (size or checksum) is rebuilt only when `rebuild_damaged` (`moe-lm data
    prepare`); otherwise it is an error, so training never silently re-tokenises what might be a
    failing disk. A shard made by another tokenizer is always an error: nothing prepared is lost.
    `heartbeat()` is called as tokenising progresses (processes waiting for the store watch it).
    """
    store = store_dir(cfg)
    shard_dir = store / "shards"
    planned = []
    template = chat_template_for(tokenizer, specs)
    for spec in specs:
        shards, empty = plan_shards(spec, template)
        planned.append((spec, shards, empty))
    with store_lock(store):
        shard_dir.mkdir(parents=True, exist_ok=True)
        clean_temporaries(shard_dir)
        manifests: dict[str, dict[str, Any]] = {}
        jobs: dict[str, ShardJob] = {}
        total_bytes = 0
        for spec, shards, _ in planned:
            for name, piece in shards:
                if name in manifests or name in jobs:
                    continue
                identity = input_identity(piece)
                status, manifest = shard_status(shard_dir, name, identity, tokenizer.fingerprint, verify)
                if status == "ok" and manifest is not None:
                    manifests[name] = manifest
                    continue
                if status == "foreign" and manifest is not None:
                    raise foreign_tokenizer_error(store, name, manifest, tokenizer)
                if status.startswith("damaged"):
                    if not rebuild_damaged:
                        raise UserError(
                            f"store shard '{shard_dir / name}' is {status} (from {spec.key}); run "
                            "`moe-lm data prepare CONFIG` to rebuild it"
                        )
                    print(f"rebuilding shard {name}: {status}", file=sys.stderr, flush=True)
                jobs[name] = ShardJob(piece, str(shard_dir), name, identity)
                total_bytes += _piece_bytes(piece)
        if jobs:
            start = time.perf_counter()
            print(f"preparing {store}: {len(jobs)} shard(s) to tokenise", flush=True)
            # largest first, so no worker is left with a big shard at the end
            ordered = sorted(jobs.values(), key=lambda j: -_piece_bytes(j.piece))
            built = _tokenise(ordered, tokenizer, cfg.data.num_proc, total_bytes, heartbeat)
            manifests.update(built)
            seconds = time.perf_counter() - start
            tokens = sum(m["tokens"] for m in built.values())
            print(
                f"tokenised {tokens:,} tokens from {total_bytes / 2**20:,.1f} MiB in {seconds:.1f} s "
                f"({total_bytes / 2**20 / max(seconds, 1e-9):.1f} MiB/s, {tokens / max(seconds, 1e-9):,.0f} tokens/s)",
                flush=True,
            )
        prepared = []
        for spec, shards, empty in planned:
            src = PreparedSource(spec, [n for n, _ in shards], [manifests[n] for n, _ in shards], empty)
            if src.tokens == 0:
                raise _no_text(src)
            if empty:
                print(f"{spec.key}: skipped {empty} empty file(s)", file=sys.stderr, flush=True)
            prepared.append(src)
        _write_manifest(store, tokenizer, prepared)
    return prepared


def _piece_bytes(piece: Piece) -> int:
    from moe_lm.data.files import FilePiece

    return piece.end - piece.start if isinstance(piece, FilePiece) else 0


def _write_manifest(store: Path, tokenizer: Tokenizer, prepared: list[PreparedSource]) -> None:
    """STORE/MANIFEST.json: per source name its shards and counts (merged with earlier entries)."""
    path = store / "MANIFEST.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    sources = data.get("sources", {})
    for src in prepared:
        sources[src.spec.key] = {
            "name": src.spec.name,
            "input": list(src.spec.files) or (src.spec.dataset.dataset if src.spec.dataset else None),
            "shards": src.names,
            "tokens": src.tokens,
            "documents": src.documents,
        }
    data = {
        "tokenizer": tokenizer.fingerprint,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "sources": sources,
    }
    tmp = path.with_name(f"MANIFEST.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.rename(path)


__all__ = ["PreparedSource", "chat_template_for", "plan_shards", "prepare_sources", "store_dir"]
