"""The cross-rank half of global-batch load balancing (`model.aux_loss_scope: global_batch`).

The model counts expert assignments per step in `StepCounts` (moe_lm/model/balance.py) and sums
them over ranks through its `reduce` seam; here that seam becomes an all-reduce over the
data-parallel ranks. Data is sharded over every rank (also under expert parallelism: an EP group's
ranks read different data and each counts its own tokens over all E experts), so the sum runs over
the whole world: E int64 numbers per MoE layer, per step (L x E at once after a counting pass).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_lm.model import MoETransformer


class CountsAllReduce:
    """Sum a counts tensor over every rank, on a communicator of its own: the all-reduce runs inside
    forward passes, and must not queue behind or interleave with DDP's or DeepSpeed's gradient
    all-reduces on the default group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        total = counts.clone()
        dist.all_reduce(total, group=self.group)
        return total


def apply_global_balance(model: MoETransformer, world_size: int) -> None:
    """Install the all-reduce for `global_batch` runs on several processes. Collective (it creates a
    process group): every rank calls it, in the same order as other group creations."""
    if model.cfg.aux_loss_scope != "global_batch" or world_size == 1:
        return
    model.balance.reduce = CountsAllReduce(dist.new_group(list(range(world_size))))
