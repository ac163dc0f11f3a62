"""A chat source's examples packed whole into rows of `seq_len + 1` tokens, with document masking.

Pretraining cuts a source's token stream into blocks wherever they fall. Conversations are packed
instead: every example (one conversation as the chat template renders it) goes whole into one row,
rows are filled best-fit, longest examples first (most rows end up nearly full), and the rest of a
row is padding. Each example is its own document in the row: it attends only to itself and its
positions restart at 0 (`Batch.document_ids`), so it is computed exactly as if it were alone, and
no label crosses from one example into the next. Padding is a document of its own and no target,
and the model routes it to no expert (Batch.real_BT): router losses and expert loads are the real
tokens' alone.

An example longer than a row (seq_len + 1 tokens: seq_len inputs and the target after the last one)
is cut to the row (`data.too_long: truncate`) or left out (`drop`); a cut example whose assistant
tokens all fell beyond the cut is left out too. All three are counted in `PackReport`, which the
run prints. The packing depends only on the example lengths and seq_len: it is the same on every
process and every start, and the loader's order over rows (and its resume state) works as for
blocks.

Targets (`data.train_on`): `assistant` trains on the tokens the chat template marks as the
assistant's (the mask stored with the source's shards), `all` on every token of the example.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_lm.data.blocks import PAD_DOC, TokenStream, encode_packed
from moe_lm.errors import UserError


@dataclass(frozen=True)
class PackReport:
    key: str  # the setting that lists the source, for the printed line
    examples: int  # packed
    rows: int
    row_len: int
    truncated: int  # longer than a row, cut to it
    dropped_long: int  # longer than a row, left out (too_long: drop)
    dropped_no_target: int  # cut, and no assistant token left before the cut
    padding: int  # padding tokens over all rows

    def line(self) -> str:
        parts = [
            f"{self.key}: {self.examples:,} conversations packed into {self.rows:,} rows of {self.row_len} "
            f"tokens ({self.padding / max(self.rows * self.row_len, 1):.1%} padding)"
        ]
        if self.truncated:
            parts.append(f"{self.truncated:,} longer than {self.row_len} tokens truncated")
        if self.dropped_long:
            parts.append(f"{self.dropped_long:,} longer than {self.row_len} tokens dropped")
        if self.dropped_no_target:
            parts.append(
                f"{self.dropped_no_target:,} dropped: no assistant token within {self.row_len} tokens"
            )
        return "; ".join(parts)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of items: (offsets [rows + 1], items [n] in row order) so that row r holds
    items[offsets[r]:offsets[r + 1]], every row's lengths summing to ≤ capacity. Deterministic."""
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, ties by index
    has_room = np.zeros(capacity + 1, dtype=bool)
    by_room: dict[int, list[int]] = {}
    rows: list[list[int]] = []
    for item in order.tolist():
        size = int(lengths[item])
        fits = has_room[size:]
        if fits.any():
            room = size + int(fits.argmax())  # the fullest row it fits in
            row = by_room[room].pop()
            if not by_room[room]:
                has_room[room] = False
            rows[row].append(item)
        else:
            room, row = capacity, len(rows)
            rows.append([item])
        left = room - size
        if left > 0:
            by_room.setdefault(left, []).append(row)
            has_room[left] = True
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    items = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(offsets[-1]))
    return offsets, items


class PackedBlocks:
    """The Blocks of one chat source (or its held-out part): `read` gives rows as `encode_packed`
    values (moe_lm/data/blocks.py), which the loader's `split_inputs` turns into labels and
    document ids."""

    def __init__(
        self,
        ids: TokenStream,
        mask: TokenStream,
        starts: np.ndarray,
        lengths: np.ndarray,
        block_len: int,
        pad_id: int,
        train_on: str,
        too_long: str,
        key: str,
    ) -> None:
        self.ids, self.mask = ids, mask
        self.block_len, self.pad_id, self.train_on = block_len, pad_id, train_on
        self.key, self.too_long = key, too_long
        self._all_starts, self._all_lengths = starts, lengths  # before the length policy (for split)
        long = lengths > block_len
        keep = ~long if too_long == "drop" else np.ones(len(lengths), dtype=bool)
        no_target = np.zeros(len(lengths), dtype=bool)
        if train_on == "assistant" and too_long == "truncate":
            for i in np.flatnonzero(long).tolist():  # cut: is an assistant token left before the cut?
                no_target[i] = not self._read_mask(int(starts[i]), block_len)[1:].any()
        keep &= ~no_target
        self.starts = starts[keep]
        self.lengths = np.minimum(lengths[keep], block_len)
        self.offsets, self.items = best_fit_decreasing(self.lengths, block_len)
        self.report = PackReport(
            key,
            int(keep.sum()),
            len(self),
            block_len,
            int((long & keep).sum()),
            int(long.sum()) if too_long == "drop" else 0,
            int(no_target.sum()),
            len(self) * block_len - int(self.lengths.sum()),
        )
        if len(self) == 0:
            raise UserError(
                f"{key}: no conversation fits in data.seq_len + 1 = {block_len} tokens "
                f"({len(lengths):,} dropped); raise data.seq_len or set data.too_long: truncate"
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def fingerprint(self) -> str:
        """What the rows hold: the shards' ids and masks (their checksums), which conversations, and
        how they are packed and labelled; a resume over other data is refused on it (loader.py)."""
        parts = [
            self.ids.checksums,
            self.mask.checksums,
            [d.name for d in self.ids.dtypes],
            self.block_len,
            self.train_on,
            self.too_long,
            hashlib.sha256(self._all_starts.tobytes() + self._all_lengths.tobytes()).hexdigest(),
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def _read_mask(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.uint8)
        self.mask.read(start, count, out)
        return out

    def _row(self, row: int) -> np.ndarray:
        ids = np.full(self.block_len, self.pad_id, dtype=np.int64)
        targets = np.zeros(self.block_len, dtype=np.uint8)
        docs = np.empty(self.block_len, dtype=np.int64)
        pos = 0
        examples = self.items[self.offsets[row] : self.offsets[row + 1]].tolist()
        for ordinal, example in enumerate(examples):
            start, n = int(self.starts[example]), int(self.lengths[example])
            self.ids.read(start, n, ids[pos : pos + n])
            if self.train_on == "assistant":
                self.mask.read(start, n, targets[pos : pos + n])
            else:
                targets[pos : pos + n] = 1
            docs[pos : pos + n] = ordinal
            pos += n
        docs[pos:] = PAD_DOC  # padding: a document of its own, never a target, routed to no expert
        return encode_packed(ids, targets, docs)

    def read(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.block_len), dtype=np.int64)
        for i, row in enumerate(idx.tolist()):
            if not 0 <= row < len(self):
                raise IndexError(f"row {row} out of range [0, {len(self)})")
            out[i] = self._row(row)
        return out

    def _subset(self, sl: slice) -> PackedBlocks:
        return PackedBlocks(
            self.ids,
            self.mask,
            self._all_starts[sl],
            self._all_lengths[sl],
            self.block_len,
            self.pad_id,
            self.train_on,
            self.too_long,
            self.key,
        )

    def split(self, fraction: float, key: str) -> tuple[PackedBlocks, PackedBlocks]:
        """(train, val): hold out the last `fraction` of the conversations (at least one), each part
        packed on its own, so no validation conversation is ever trained on."""
        n = len(self._all_lengths)
        n_val = max(1, round(n * fraction))
        if n - n_val < 1:
            raise UserError(
                f"{key} holds {n} conversation(s), too few to hold out val_fraction = {fraction}; add data "
                "or list validation files (val_files)"
            )
        return self._subset(slice(0, n - n_val)), self._subset(slice(n - n_val, n))


def examples_of(
    shard_dir: Path, names: list[str], manifests: list[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every example of a chat source, in the source's token stream."""
    starts: list[np.ndarray] = []
    offset = 0
    for name, manifest in zip(names, manifests):
        ends = np.fromfile(shard_dir / f"{name}.docs", dtype=np.int64)
        if len(ends):
            starts.append(offset + np.concatenate(([0], ends[:-1])))
        offset += int(manifest["tokens"])
    begin = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    return begin, np.diff(np.append(begin, offset))


def packed_blocks(
    shard_dir: Path,
    names: list[str],
    manifests: list[dict[str, Any]],
    block_len: int,
    pad_id: int,
    train_on: str,
    too_long: str,
    key: str,
) -> PackedBlocks:
    """A prepared chat source as rows of packed examples."""
    ids = TokenStream(shard_dir, names, manifests)
    mask = TokenStream(shard_dir, names, manifests, suffix="mask")
    starts, lengths = examples_of(shard_dir, names, manifests)
    return PackedBlocks(ids, mask, starts, lengths, block_len, pad_id, train_on, too_long, key)


__all__ = ["PackReport", "PackedBlocks", "best_fit_decreasing", "examples_of", "packed_blocks"]
