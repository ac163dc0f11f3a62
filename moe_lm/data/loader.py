"""Shuffled, data-parallel-sharded micro-batches over packed blocks, resumable to the exact batch.

Epoch e visits the blocks in the order `perm_e = randperm(N, generator seeded with seed + e)`; rank r
of D takes `perm_e[r::D]`, truncated to N // D so every rank has the same number of batches. Rank
r's i-th micro-batch of B blocks is therefore `perm_e[(i*B + j)*D + r]` for j < B: the i-th batches
of all D ranks together are exactly the slice `perm_e[i*B*D : (i+1)*B*D]`, i.e. the same set of
blocks as the i-th batch of one process with micro_batch_size B*D. Changing the number of ranks
keeps the sample stream; only who reads which block changes.

The state is (seed, epoch, position); the permutation is recomputed from it, so a restored loader
gives bit-identical batches to one that was never interrupted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch

from moe_lm.errors import UserError


def _split(x_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_BL = x_BL.long()
    return x_BL[:, :-1].contiguous(), x_BL[:, 1:].contiguous()


class ResumableLoader:
    """`next_batch()` → (input_ids [B, T], labels [B, T]) int64, looping over epochs forever."""

    def __init__(
        self,
        blocks: torch.Tensor,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if blocks.dim() != 2 or blocks.shape[1] < 2:
            raise ValueError(f"blocks must be [N, seq_len+1] with seq_len ≥ 1, got {tuple(blocks.shape)}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be ≥ 1, got {micro_batch_size}")
        self.blocks = blocks
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.drop_last = drop_last
        self.per_rank = len(blocks) // dp_size
        full, rest = divmod(self.per_rank, micro_batch_size)
        self._batches_per_epoch = full + (1 if rest and not drop_last else 0)
        if self._batches_per_epoch == 0:
            raise UserError(
                f"the training data has {len(blocks)} blocks, fewer than one batch of train.micro_batch_size "
                f"{micro_batch_size} × {dp_size} data-parallel ranks; add data, lower data.seq_len or "
                "train.micro_batch_size"
            )
        self._epoch = 0
        self._position = 0  # batches already drawn in this epoch
        self._order: torch.Tensor | None = None  # this rank's block indices for self._epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    @property
    def batches_per_epoch(self) -> int:
        return self._batches_per_epoch

    def _rank_order(self) -> torch.Tensor:
        if self._order is None:
            gen = torch.Generator().manual_seed(self.seed + self._epoch)
            perm = torch.randperm(len(self.blocks), generator=gen)
            self._order = perm[self.dp_rank :: self.dp_size][: self.per_rank]
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._position >= self._batches_per_epoch:
            self._epoch += 1
            self._position = 0
            self._order = None
        b = self.micro_batch_size
        idx = self._rank_order()[self._position * b : (self._position + 1) * b]
        self._position += 1
        return _split(self.blocks[idx])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_blocks": len(self.blocks),
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off. The saved seed wins over the constructor's.

        The data must be the same; a different micro-batch size or rank count keeps the epoch and
        skips the same number of samples (exact only when batch size × ranks is unchanged).
        """
        if state["num_blocks"] != len(self.blocks):
            raise UserError(
                f"the checkpoint's data loader was over {state['num_blocks']} blocks but the data now has "
                f"{len(self.blocks)}; resume with the same data files, tokenizer and data.seq_len"
            )
        self.seed = int(state["seed"])
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
        self._order = None


def eval_batches(
    blocks: torch.Tensor,
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
    per_rank = len(blocks) // dp_size
    if per_rank == 0:
        raise UserError(
            f"the validation split has {len(blocks)} blocks, fewer than the {dp_size} data-parallel ranks; "
            "add validation data or raise data.val_fraction"
        )
    if max_batches is not None:
        per_rank = min(per_rank, max(max_batches * micro_batch_size // dp_size, 1))
    idx = torch.arange(per_rank * dp_size)[dp_rank::dp_size]
    return (_split(blocks[c]) for c in idx.split(micro_batch_size))
