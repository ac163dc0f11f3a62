"""Shuffled, data-parallel-sharded micro-batches over one source or a weighted mixture, resumable
to the exact batch.

Samples are numbered globally: the i-th micro-batch of rank r of D holds global samples
g = (i·B + j)·D + r for j < B, so the i-th batches of all D ranks together are exactly the
samples [i·B·D, (i+1)·B·D), the same set as the i-th batch of one process with micro-batch B·D.
Changing the number of ranks keeps the sample stream; only who reads which block changes.

One prepared source: epochs. Epoch e visits the blocks in the order π_e (a seeded Permutation, see
moe_lm/data/mixture.py); each epoch has N // (B·D) batches, the remainder is dropped.

A mixture (or a streaming source): an endless stream. Sample g goes to source s with ordinal o
(Mixture); for a prepared source that is block π_{s,e}(o mod N_s) with e = o // N_s, so a small
source repeats its epochs (each freshly shuffled) and a large one is subsampled; a streaming source
serves its o-th block in stream order.

The state is (seed, epoch, position) plus each streaming source's position; the order is
recomputed from it, so a restored loader gives bit-identical batches to one never interrupted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moe_lm.data.blocks import Blocks, as_blocks, split_inputs
from moe_lm.data.mixture import Mixture, Permutation, derive_key
from moe_lm.data.streaming import StreamBlocks
from moe_lm.errors import UserError


@dataclass
class TrainSource:
    name: str
    weight: float
    blocks: Any  # Blocks (prepared) or StreamBlocks (streaming)

    @property
    def streaming(self) -> bool:
        return isinstance(self.blocks, StreamBlocks)


class ResumableLoader:
    """`next_batch()` → (input_ids [B, T], labels [B, T]) int64, forever."""

    def __init__(
        self,
        data: Any,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be ≥ 1, got {micro_batch_size}")
        sources = data if isinstance(data, list) else [TrainSource("corpus", 1.0, as_blocks(data))]
        self.sources: list[TrainSource] = sources
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.drop_last = drop_last
        self.single = len(sources) == 1 and not sources[0].streaming
        self.mixture = (
            None if self.single else Mixture([s.weight for s in sources], seed, [s.name for s in sources])
        )
        self._legacy_order = False  # checkpoints from before Permutation used torch.randperm
        self._perms: dict[tuple[int, int], Permutation] = {}
        self._epoch = 0
        self._position = 0  # batches already drawn in this epoch (mixture: since the start)
        if self.single:
            n = len(sources[0].blocks)
            self.per_rank = n // dp_size
            full, rest = divmod(self.per_rank, micro_batch_size)
            self._batches_per_epoch = full + (1 if rest and not drop_last else 0)
            if self._batches_per_epoch == 0:
                raise UserError(
                    f"the training data has {n} blocks, fewer than one batch of train.micro_batch_size "
                    f"{micro_batch_size} × {dp_size} data-parallel ranks; add data, lower data.seq_len or "
                    "train.micro_batch_size"
                )
        else:
            self.per_rank = 0
            self._batches_per_epoch = 1 << 62

    @property
    def blocks(self) -> Blocks:
        return self.sources[0].blocks  # type: ignore[no-any-return]

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    @property
    def batches_per_epoch(self) -> int:
        return self._batches_per_epoch

    def _perm(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        if key not in self._perms:
            self._perms.clear()  # one epoch at a time per source is all a batch needs
            n = len(self.sources[source].blocks)
            self._perms[key] = Permutation(
                n, derive_key("blocks", self.seed, self.sources[source].name, epoch)
            )
        return self._perms[key]

    def _single_indices(self) -> np.ndarray:
        b, d, r = self.micro_batch_size, self.dp_size, self.dp_rank
        k = np.arange(self._position * b, min((self._position + 1) * b, self.per_rank))
        g = k * d + r  # this rank's samples of the epoch
        if self._legacy_order:
            gen = torch.Generator().manual_seed(self.seed + self._epoch)
            return torch.randperm(len(self.blocks), generator=gen).numpy()[g]
        return self._perm(0, self._epoch)(g)

    def _mixture_batch(self) -> np.ndarray:
        assert self.mixture is not None
        b, d = self.micro_batch_size, self.dp_size
        g = self._position * b * d + np.arange(b) * d + self.dp_rank
        source_of, ordinal = self.mixture.assign(g)
        out = np.empty((b, self.sources[0].blocks.block_len), dtype=np.int64)
        for s in np.unique(source_of).tolist():
            rows = np.nonzero(source_of == s)[0]
            src = self.sources[s]
            if src.streaming:
                for row in rows.tolist():
                    out[row] = src.blocks.block(int(ordinal[row]))
                continue
            n = len(src.blocks)
            epochs, offsets = np.divmod(ordinal[rows], n)
            for e in np.unique(epochs).tolist():
                sel = epochs == e
                out[rows[sel]] = src.blocks.read(self._perm(s, e)(offsets[sel]))
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.single:
            if self._position >= self._batches_per_epoch:
                self._epoch += 1
                self._position = 0
            x_BL = self.blocks.read(self._single_indices())
        else:
            x_BL = self._mixture_batch()
        self._position += 1
        return split_inputs(x_BL)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def consumed(self) -> dict[str, int]:
        """Samples drawn so far from each source, by all ranks together."""
        global_batch = self.micro_batch_size * self.dp_size
        if self.single:
            return {
                self.sources[0].name: (self._epoch * self._batches_per_epoch + self._position) * global_batch
            }
        assert self.mixture is not None
        counts = self.mixture.consumed(self._position * global_batch)
        return {s.name: c for s, c in zip(self.sources, counts)}

    def _num_blocks(self) -> int | list[int | None]:
        if self.single:
            return len(self.blocks)
        return [None if s.streaming else len(s.blocks) for s in self.sources]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_blocks": self._num_blocks(),
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "order": "legacy-randperm" if self._legacy_order else "feistel",
            "sources": [[s.name, s.weight] for s in self.sources],
            "streams": {s.name: s.blocks.state_dict() for s in self.sources if s.streaming},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off. The saved seed wins over the constructor's.

        The data must be the same; a different micro-batch size or rank count (or mixture weights)
        keeps going from the same point in the stream, exactly only when nothing changed.
        """
        mixture = [[s.name, s.weight] for s in self.sources]
        saved_mixture = state.get("sources", [["corpus", 1.0]])
        if saved_mixture != mixture and not self.single:
            warnings.warn(
                f"resuming with data sources {mixture} instead of {saved_mixture}: the mixture changes "
                "from here on and each source continues approximately where it was",
                stacklevel=2,
            )
        elif state["num_blocks"] != self._num_blocks():
            raise UserError(
                f"the checkpoint's data loader was over {state['num_blocks']} blocks but the data now has "
                f"{self._num_blocks()}; resume with the same data files, tokenizer and data.seq_len"
            )
        self.seed = int(state["seed"])
        if self.mixture is not None:
            self.mixture.reseed(self.seed)
        self._perms.clear()
        self._legacy_order = self.single and state.get("order", "legacy-randperm") == "legacy-randperm"
        self._epoch = int(state["epoch"])
        position = int(state["position"])
        saved_global = int(state["micro_batch_size"]) * int(state["dp_size"])
        global_batch = self.micro_batch_size * self.dp_size
        if saved_global != global_batch:
            position = position * saved_global // global_batch
            warnings.warn(
                f"resuming the data loader with micro_batch_size × ranks = {global_batch} instead of "
                f"{saved_global}: the sample order continues approximately, not exactly",
                stacklevel=2,
            )
        self._position = min(position, self._batches_per_epoch)
        for s in self.sources:
            if s.streaming and s.name in state.get("streams", {}):
                s.blocks.load_state_dict(state["streams"][s.name])


def eval_batches(
    blocks: Any,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation micro-batches in a fixed order: rank r of D reads blocks r, r+D, ... of the first
    per_rank × D blocks. `max_batches` counts the micro-batches of all ranks together, so 1 and D
    processes evaluate the same max_batches × micro_batch_size blocks (and report the same loss;
    the count is rounded down to a multiple of D). Every rank gets the same number of batches, so
    collectives stay matched; the last batch may be smaller. Without max_batches: the whole split
    less its last len % D blocks."""
    blocks = as_blocks(blocks)
    per_rank = len(blocks) // dp_size
    if per_rank == 0:
        raise UserError(
            f"the validation split has {len(blocks)} blocks, fewer than the {dp_size} data-parallel ranks; "
            "add validation data or raise data.val_fraction"
        )
    if max_batches is not None:
        per_rank = min(per_rank, max(max_batches * micro_batch_size // dp_size, 1))
    idx = np.arange(per_rank * dp_size)[dp_rank::dp_size]
    chunks = [idx[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
    return (split_inputs(blocks.read(c)) for c in chunks)


__all__ = ["ResumableLoader", "TrainSource", "eval_batches"]
