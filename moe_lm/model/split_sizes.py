"""The routing counts' seam: the one place the training step copies data from the device to the host.

Dropless routing decides at run time how many rows each expert (and, under expert parallelism, each
rank) gets. A loop of per-expert GEMMs and an all-to-all with uneven splits need those numbers as
Python ints, so they are read from the device here, and nowhere else in the step (STYLE.md #13).

Routing the reads through one function lets a rehearsal (moe_lm/plan) run the step on fake tensors,
which hold no values, by answering them from a stated routing assumption instead
(`assumed_splits`). Three questions are asked, by `over`:

  "experts"    rows per expert, of the `rows` rows sorted by expert (experts.py's loop path; under
               expert parallelism the experts this rank holds)
  "ranks_out"  rows this rank sends to each rank of its expert-parallel group (`rows` in all)
  "ranks_in"   rows this rank receives from each rank of the group (`rows`: what it sends)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch

Over = Literal["experts", "ranks_out", "ranks_in"]
# (counts tensor, rows, over) -> the counts as ints: what a rehearsal answers instead of the device
SplitReader = Callable[[torch.Tensor, int, Over], list[int]]

_reader: SplitReader | None = None


def split_sizes(counts: torch.Tensor, rows: int, over: Over) -> list[int]:
    """`counts` (1-D, on the device) as Python ints: a host sync, except under `assumed_splits`."""
    if _reader is not None:
        return _reader(counts, rows, over)
    return counts.tolist()  # type: ignore[no-any-return]


@contextmanager
def assumed_splits(reader: SplitReader) -> Iterator[None]:
    """Inside: every `split_sizes` is answered by `reader`, and nothing is read from the device."""
    global _reader
    previous, _reader = _reader, reader
    try:
        yield
    finally:
        _reader = previous
