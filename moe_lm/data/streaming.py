"""A streaming source: a `datasets.IterableDataset` tokenised while training, with a resumable position.

The stream's documents, each followed by EOS, are cut into blocks of `seq_len + 1` in order; block
o is the o-th of that sequence, the same in every process. Every data-parallel rank reads the
whole stream and keeps the blocks the mixture gives it (so the blocks do not depend on the number
of ranks), at the cost of every rank tokenising all of the source's text: prepare a source
(`streaming: false`) when tokenising would hold training up. When the stream ends it starts over
(the next epoch), in the same order: streams are not shuffled.

Position = the dataset's own `state_dict()` (documents handed out so far) + the tokens of those
documents not yet served as blocks + the next ordinal; restoring it continues bit-identically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from moe_lm.data.hf_sources import DatasetSpec, open_stream
from moe_lm.errors import UserError

_DOCS_PER_ENCODE = 64


class StreamBlocks:
    def __init__(self, spec: DatasetSpec, tokenizer: Any, block_len: int) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.block_len = block_len
        self.epoch = 0
        self.next_ordinal = 0  # ordinal of the block the stream produces next
        self._buffer = np.zeros(0, dtype=np.int64)
        self._dataset: Any = None
        self._rows: Iterator[dict[str, Any]] | None = None
        self._blocks_this_epoch = 0

    def _open(self, state: dict[str, Any] | None = None) -> None:
        self._dataset = open_stream(self.spec)
        if state is not None:
            self._dataset.load_state_dict(state)
        self._rows = iter(self._dataset)

    def _refill(self) -> bool:
        """Tokenise the next few documents into the buffer; False at the end of the stream."""
        if self._rows is None:
            self._open()
        assert self._rows is not None
        texts: list[str] = []
        for row in self._rows:
            text = row[self.spec.text_field]
            if text:
                texts.append(text)
            if len(texts) >= _DOCS_PER_ENCODE:
                break
        if not texts:
            return False
        eos = self.tokenizer.eos_id
        ids = [i for row in self.tokenizer.encode_batch(texts) for i in (*row, eos)]
        self._buffer = np.concatenate((self._buffer, np.asarray(ids, dtype=np.int64)))
        return True

    def _next(self) -> np.ndarray:
        while len(self._buffer) < self.block_len:
            if self._refill():
                continue
            if self._blocks_this_epoch == 0:
                raise UserError(
                    f"{self.spec.key}: the stream of dataset '{self.spec.dataset}' yields no block of "
                    f"seq_len+1 = {self.block_len} tokens; add data or lower data.seq_len"
                )
            # end of the stream: the next epoch starts over; the tail shorter than a block is dropped
            self.epoch += 1
            self._blocks_this_epoch = 0
            self._buffer = self._buffer[:0]
            self._open()
        block, self._buffer = self._buffer[: self.block_len], self._buffer[self.block_len :]
        self.next_ordinal += 1
        self._blocks_this_epoch += 1
        return block

    def block(self, ordinal: int) -> np.ndarray:
        """Block `ordinal` of the stream; ordinals must not go backwards (a rank's never do)."""
        if ordinal < self.next_ordinal:
            raise ValueError(f"stream block {ordinal} was already passed (next is {self.next_ordinal})")
        self.advance_to(ordinal)
        return self._next()

    def advance_to(self, ordinal: int) -> None:
        """Pass over the blocks before `ordinal` (other ranks' blocks); a no-op if already there."""
        while self.next_ordinal < ordinal:
            self._next()

    def fingerprint(self) -> str:
        """What the stream is: dataset, configuration, split, field, tokenizer and block length (its
        content is not known before it is read)."""
        spec = self.spec
        parts = [
            spec.dataset,
            spec.config,
            spec.split,
            spec.text_field,
            self.tokenizer.fingerprint,
            self.block_len,
        ]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "next_ordinal": self.next_ordinal,
            "blocks_this_epoch": self._blocks_this_epoch,
            "buffer": self._buffer.tolist(),
            "dataset": self._dataset.state_dict() if self._dataset is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.next_ordinal = int(state["next_ordinal"])
        self._blocks_this_epoch = int(state["blocks_this_epoch"])
        self._buffer = np.asarray(state["buffer"], dtype=np.int64)
        if state["dataset"] is None:
            self._dataset, self._rows = None, None
        else:
            self._open(state["dataset"])


__all__ = ["StreamBlocks"]
