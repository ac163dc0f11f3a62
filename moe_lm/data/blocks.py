"""Blocks of `seq_len + 1` tokens read from the store's shards by memory map.

A source's token stream is its shards' ids in order; block b is stream[b*L : (b+1)*L] (the tail
shorter than a block is dropped), so a block may span two shards. Nothing is loaded up front: a
process holds the shards' cumulative token counts (8 bytes per shard) and up to `MAX_OPEN` open
maps; a read copies just the asked blocks out as int64 and then tells the kernel it may drop the
pages from this process (MADV_DONTNEED: they stay in the page cache for the next reader), so the
resident memory of a training process does not grow with the corpus, however long it runs.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from moe_lm.errors import UserError

MAX_OPEN = 64  # open shard maps per process (each holds a file descriptor)
_PAGE = mmap.PAGESIZE


class Blocks(Protocol):
    """Anything the loader can draw from: a length and a gather of whole blocks."""

    block_len: int

    def __len__(self) -> int: ...

    def read(self, idx: np.ndarray) -> np.ndarray:
        """[len(idx), block_len] int64 for block indices `idx`."""
        ...


class ArrayBlocks:
    """Blocks already in memory ([N, L] tensor or array): tests and small tools."""

    def __init__(self, blocks: Any) -> None:
        self.blocks = blocks.numpy() if isinstance(blocks, torch.Tensor) else np.asarray(blocks)
        if self.blocks.ndim != 2 or self.blocks.shape[1] < 2:
            raise ValueError(
                f"blocks must be [N, seq_len+1] with seq_len ≥ 1, got {tuple(self.blocks.shape)}"
            )
        self.block_len = int(self.blocks.shape[1])

    def __len__(self) -> int:
        return len(self.blocks)

    def read(self, idx: np.ndarray) -> np.ndarray:
        return self.blocks[np.asarray(idx, dtype=np.int64)].astype(np.int64)

    def fingerprint(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.blocks.astype(np.int64)).tobytes()).hexdigest()


class TokenStream:
    """The concatenated ids of a list of shards, read by offset (`suffix="mask"`: a chat source's
    assistant masks, one uint8 per token)."""

    def __init__(
        self, shard_dir: Path, names: list[str], manifests: list[dict[str, Any]], suffix: str = "ids"
    ) -> None:
        self.paths = [shard_dir / f"{n}.{suffix}" for n in names]
        self.dtypes = [np.dtype(np.uint8 if suffix == "mask" else m["dtype"]) for m in manifests]
        self.checksums = [m.get("files", {}).get(suffix, {}).get("xxh3") for m in manifests]  # of these files
        counts = np.array([m["tokens"] for m in manifests], dtype=np.int64)
        self.starts = np.concatenate(([0], np.cumsum(counts)))  # shard i holds [starts[i], starts[i+1])
        self._maps: OrderedDict[int, mmap.mmap] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _map(self, i: int) -> mmap.mmap:
        m = self._maps.pop(i, None)
        if m is None:
            if len(self._maps) >= MAX_OPEN:
                self._maps.popitem(last=False)[1].close()
            with self.paths[i].open("rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._maps[i] = m
        return m

    def read(self, start: int, count: int, out: np.ndarray) -> None:
        """out[:count] = stream[start : start + count]."""
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < count:
            lo = start + done - int(self.starts[shard])
            n = min(count - done, int(self.starts[shard + 1] - self.starts[shard]) - lo)
            if n > 0:
                m, dtype = self._map(shard), self.dtypes[shard]
                out[done : done + n] = np.frombuffer(m, dtype=dtype, count=n, offset=lo * dtype.itemsize)
                first = lo * dtype.itemsize // _PAGE * _PAGE
                m.madvise(mmap.MADV_DONTNEED, first, (lo + n) * dtype.itemsize - first)
                done += n
            shard += 1

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __getstate__(self) -> dict[str, Any]:  # maps are per process
        return {**self.__dict__, "_maps": OrderedDict()}


class StoreBlocks:
    """Blocks [first, first + count) of a token stream, renumbered from 0."""

    def __init__(self, stream: TokenStream, block_len: int, first: int = 0, count: int | None = None) -> None:
        self.stream = stream
        self.block_len = block_len
        self.first = first
        self.count = len(stream) // block_len - first if count is None else count

    def __len__(self) -> int:
        return self.count

    def fingerprint(self) -> str:
        """The token ids these blocks hold (the shards' checksums, recorded when they were written)
        and how they are cut: equal exactly when the blocks are."""
        parts = [
            self.stream.checksums,
            [d.name for d in self.stream.dtypes],
            self.block_len,
            self.first,
            self.count,
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def read(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((len(idx), self.block_len), dtype=np.int64)
        for row, b in enumerate(idx.tolist()):
            if not 0 <= b < self.count:
                raise IndexError(f"block {b} out of range [0, {self.count})")
            self.stream.read((self.first + b) * self.block_len, self.block_len, out[row])
        return out

    def split(self, fraction: float, key: str) -> tuple[StoreBlocks, StoreBlocks]:
        """(train, val): hold out the last `fraction` of the blocks (at least one)."""
        n = self.count
        n_val = max(1, round(n * fraction))
        if n - n_val < 1:
            raise UserError(
                f"{key} yields {n} block(s) of seq_len+1 = {self.block_len} tokens, too few to hold out "
                f"val_fraction = {fraction}; add data, lower data.seq_len or list validation files (val_files)"
            )
        return (
            StoreBlocks(self.stream, self.block_len, self.first, n - n_val),
            StoreBlocks(self.stream, self.block_len, self.first + n - n_val, n_val),
        )


def as_blocks(blocks: Any) -> Blocks:
    return blocks if hasattr(blocks, "read") and hasattr(blocks, "block_len") else ArrayBlocks(blocks)


# Rows of packed examples (moe_lm/data/packing.py) carry more than ids in their int64 values, so they
# travel through the loader, its mixtures and its resume state exactly as plain blocks do:
#   bits 0-31 the token id, bit 32 "a target" (in the loss), bits 33-61 the example's ordinal in the
#   row (padding: PAD_DOC), bit 62 set on every value of such a row.
# `split_inputs` turns them into labels (-100 off target and across examples), document ids and the
# real (not padding) tokens. A reader that forgot to would feed ids ≥ 2^62 to the embedding and fail
# at once, never silently.
_ID_BITS = 32
_TARGET = 1 << 32
_DOC_SHIFT = 33
_DOC_MASK = (1 << 29) - 1
PAD_DOC = _DOC_MASK  # the document id of a row's padding (no row holds that many examples)
PACKED_ROW = 1 << 62


def encode_packed(ids: np.ndarray, targets: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """One row (or rows) of packed examples as the loader carries them."""
    return (
        ids.astype(np.int64)
        | (targets.astype(np.int64) << _ID_BITS)
        | (docs.astype(np.int64) << _DOC_SHIFT)
        | PACKED_ROW
    )


class Batch(tuple):  # noqa: SLOT001 - a pair with two attributes
    """(input_ids [B, T], labels [B, T]) int64, unpacked like the plain pair it was before packed rows.

    `document_ids` [B, T]: each token's example in its row, when some row holds packed examples (rows
    of plain blocks are one document: 0), else None. `packed_B`: which rows hold packed examples.
    `real_BT`: 1 at every token but the packed rows' padding, when there is padding, else None
    (the model's attention_mask: padding is routed to no expert and counts in no router statistic)."""

    document_ids: torch.Tensor | None
    packed_B: torch.Tensor | None
    real_BT: torch.Tensor | None

    def __new__(
        cls,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        packed_B: torch.Tensor | None = None,
        real_BT: torch.Tensor | None = None,
    ) -> Batch:
        batch = super().__new__(cls, (input_ids, labels))
        batch.document_ids, batch.packed_B, batch.real_BT = document_ids, packed_B, real_BT
        return batch


def split_inputs(x_BL: np.ndarray | torch.Tensor) -> Batch:
    """(input_ids, labels) = (block[:, :-1], block[:, 1:]) as int64 tensors; rows of packed examples
    (bit 62) decoded: labels -100 where the next token is no target or starts another example."""
    x_BL = torch.as_tensor(x_BL).long()
    packed_B = (x_BL[:, 0] & PACKED_ROW) != 0
    if not bool(packed_B.any()):
        return Batch(x_BL[:, :-1].contiguous(), x_BL[:, 1:].contiguous())
    ids_BL = torch.where(packed_B[:, None], x_BL & (_TARGET - 1), x_BL)
    target_BL = torch.where(packed_B[:, None], (x_BL & _TARGET) != 0, True)
    docs_BL = torch.where(packed_B[:, None], (x_BL >> _DOC_SHIFT) & _DOC_MASK, 0)
    keep_BT = target_BL[:, 1:] & (docs_BL[:, 1:] == docs_BL[:, :-1])
    labels = torch.where(keep_BT, ids_BL[:, 1:], -100)
    pad_BT = packed_B[:, None] & (docs_BL[:, :-1] == PAD_DOC)
    real_BT = (~pad_BT).long() if bool(pad_BT.any()) else None
    docs_BT = docs_BL[:, :-1].contiguous()
    return Batch(ids_BL[:, :-1].contiguous(), labels.contiguous(), docs_BT, packed_B, real_BT)


def batch_document_ids(batch: Any, eos_id: int, document_mask: bool) -> torch.Tensor | None:
    """The document ids [B, T] a batch is computed with, or None for plain causal attention: packed
    conversations bring theirs (Batch.document_ids); rows of text are cut at EOS with
    `document_mask` (data.document_mask), else are one document each."""
    docs = getattr(batch, "document_ids", None)
    if not document_mask:
        return docs
    from_eos = document_ids(batch[0], eos_id)
    return from_eos if docs is None else torch.where(batch.packed_B[:, None], docs, from_eos)


def document_ids(input_ids_BT: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per token, how many EOS come before it in its row: tokens of one document share an id (the
    EOS belongs to the document it ends)."""
    eos_BT = (input_ids_BT == eos_id).long()
    return eos_BT.cumsum(dim=1) - eos_BT


__all__ = [
    "PACKED_ROW",
    "PAD_DOC",
    "ArrayBlocks",
    "Batch",
    "Blocks",
    "StoreBlocks",
    "TokenStream",
    "as_blocks",
    "batch_document_ids",
    "document_ids",
    "encode_packed",
    "split_inputs",
]
