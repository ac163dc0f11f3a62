"""`datasets` sources: a `save_to_disk` directory, or a dataset name loaded by `datasets.load_dataset`.

A name is read from the local Hugging Face cache when offline (HF_DATASETS_OFFLINE=1, as `make`
sets it); a name that is neither cached nor reachable is a one-line error naming it. Prepared
sources are cut into pieces of `PIECE_ROWS` rows, keyed by the dataset's fingerprint (its content).
Streaming sources are opened as an `IterableDataset` instead (see moe_lm/data/streaming.py).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_lm.errors import UserError

if TYPE_CHECKING:
    import datasets

    from moe_lm.data.chat import ChatSpec

PIECE_ROWS = 100_000


@dataclass(frozen=True)
class DatasetSpec:
    dataset: str  # a save_to_disk directory or a dataset name
    config: str | None
    split: str
    text_field: str
    key: str  # the setting, for messages (data.sources.NAME.dataset)
    chat: ChatSpec | None = None  # rows are conversations (moe_lm/data/chat.py), not text_field


@dataclass(frozen=True)
class DatasetPiece:
    spec: DatasetSpec
    fingerprint: str
    start: int
    end: int


def _is_saved(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _what(spec: DatasetSpec) -> str:
    extra = f", config '{spec.config}'" if spec.config else ""
    return f"dataset '{spec.dataset}'{extra}, split '{spec.split}'"


def _pick_split(ds: Any, spec: DatasetSpec) -> Any:
    import datasets

    if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):
        if spec.split not in ds:
            raise UserError(
                f"{spec.key}: {_what(spec)} not found (splits: {', '.join(ds)}); set the source's split"
            )
        return ds[spec.split]
    return ds


def _load(spec: DatasetSpec, streaming: bool) -> Any:
    import datasets

    datasets.disable_progress_bars()  # one line per stage is ours; its bars would interleave with errors
    path = Path(spec.dataset)
    if path.is_dir() and _is_saved(path):
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise UserError(
                f"{spec.key}: cannot read the saved dataset '{path}' ({_first_line(e)})"
            ) from None
        ds = _pick_split(ds, spec)
        return ds.to_iterable_dataset(num_shards=max(1, len(ds) // PIECE_ROWS)) if streaming else ds
    try:
        ds = datasets.load_dataset(spec.dataset, spec.config, split=spec.split, streaming=streaming)
    except Exception as e:
        offline = datasets.config.HF_DATASETS_OFFLINE or datasets.config.HF_HUB_OFFLINE
        where = "not in the local Hugging Face cache and the Hub is " + (
            "offline" if offline else "unreachable"
        )
        if "split" in str(e).lower() and "unknown" in str(e).lower():
            where = "unknown split"
        raise UserError(
            f"{spec.key}: cannot load {_what(spec)}: {where} ({_first_line(e)}); check the name, or load it "
            "once with network access so it is cached"
        ) from None
    return ds


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _check_field(ds: Any, spec: DatasetSpec) -> None:
    names = list(ds.column_names or [])
    if spec.chat is not None:
        if names:
            spec.chat.check_columns(names, f"{spec.key}: {_what(spec)}")
        return
    if names and spec.text_field not in names:
        raise UserError(
            f"{spec.key}: {_what(spec)} has no field '{spec.text_field}' (fields: {', '.join(names)}); "
            f"set the source's text_field"
        )
    feature = (ds.features or {}).get(spec.text_field)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(
            f"{spec.key}: field '{spec.text_field}' of {_what(spec)} holds {feature}, not text; "
            "set the source's text_field"
        )


@functools.lru_cache(maxsize=4)
def open_dataset(spec: DatasetSpec) -> datasets.Dataset:
    """The (memory-mapped) dataset of `spec`, checked; cached per process (workers reopen it)."""
    ds = _load(spec, streaming=False)
    _check_field(ds, spec)
    return ds


def open_stream(spec: DatasetSpec) -> datasets.IterableDataset:
    ds = _load(spec, streaming=True)
    _check_field(ds, spec)
    return ds.select_columns([spec.text_field])


def dataset_pieces(spec: DatasetSpec) -> list[DatasetPiece]:
    ds = open_dataset(spec)
    n = len(ds)
    return [
        DatasetPiece(spec, ds._fingerprint, a, min(a + PIECE_ROWS, n))
        for a in range(0, max(n, 1), PIECE_ROWS)
    ]


def _as_rows(value: Any) -> Any:
    """A messages list as `datasets` gives it: a `Sequence` of {role, content} features comes as one
    dict of equal-length lists ({"role": [...], "content": [...]}), a list of structs as a list of
    dicts. The first becomes the second; anything else is left for parse_messages to judge."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        sizes = {len(v) for v in value.values()}
        if len(sizes) == 1:
            return [dict(zip(value, turn)) for turn in zip(*value.values())]
    return value


def read_rows(piece: DatasetPiece) -> Iterator[tuple[list[Any], bool, int]]:
    """Batches of (documents, True, bytes of text) of rows [start, end); a chat source's documents
    are Conversations (moe_lm/data/chat.py)."""
    ds = open_dataset(piece.spec)
    chat = piece.spec.chat
    for a in range(piece.start, piece.end, 1000):
        rows = ds[a : min(a + 1000, piece.end)]
        if chat is not None:  # conversations: checked rows, with their size as text for the progress bar
            columns = chat.columns(list(rows))
            n = len(rows[columns[0]]) if columns else 0
            what = _what(piece.spec)
            records = [{c: _as_rows(rows[c][i]) for c in columns} for i in range(n)]
            found = [
                chat.conversation(r, f"{piece.spec.key}: row {a + i} of {what}")
                for i, r in enumerate(records)
            ]
            yield found, True, 0
            continue
        texts = [t or "" for t in rows[piece.spec.text_field]]
        yield texts, True, sum(len(t) for t in texts)


def iter_dataset_texts(spec: DatasetSpec, streaming: bool) -> Iterator[str]:
    """Documents of a dataset source in order, for tokenizer training."""
    if streaming:
        return (row[spec.text_field] for row in open_stream(spec) if row[spec.text_field])
    return (t for p in dataset_pieces(spec) for ts, _, _ in read_rows(p) for t in ts if t)


__all__ = [
    "DatasetPiece",
    "DatasetSpec",
    "dataset_pieces",
    "iter_dataset_texts",
    "open_dataset",
    "open_stream",
    "read_rows",
]
