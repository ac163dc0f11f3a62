"""The routing a rehearsal assumes, in place of the data: how many rows each expert and each rank get.

Balanced by default: every expert gets 1/E of the (token, slot) assignments. With imbalance F the
hottest expert (expert 0, on expert-parallel rank 0: the rank a plan rehearses) gets F/E of them and
the other E-1 share the rest equally, so F is the hottest expert's load over the mean, as the train
records' `imbalance` reports it. Every rank routes its own tokens the same way, so under expert
parallelism a rank receives from each peer what it would send to itself.

`AssumedRouting.reader(...)` answers the routing counts' seam (moe_lm/model/split_sizes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_lm.errors import UserError
from moe_lm.model.split_sizes import Over


def split_rows(rows: int, weights: list[float]) -> list[int]:
    """`rows` split in proportion to `weights`, in integers summing to `rows` (largest remainders,
    ties to the lower index)."""
    total = sum(weights)
    exact = [rows * w / total for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: rows - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class AssumedRouting:
    num_experts: int
    imbalance: float = 1.0  # the hottest expert's load over the mean load

    def __post_init__(self) -> None:
        if not 1.0 <= self.imbalance <= self.num_experts:
            raise UserError(
                f"--imbalance {self.imbalance:g} is outside [1, {self.num_experts}]: 1 is balanced, "
                f"{self.num_experts} (the number of experts) sends every token to one expert"
            )

    @property
    def loads(self) -> list[float]:
        """Each expert's share of the assignments (summing to 1)."""
        e, hot = self.num_experts, self.imbalance / self.num_experts
        if e == 1:
            return [1.0]
        return [hot] + [(1.0 - hot) / (e - 1)] * (e - 1)

    def rank_loads(self, ep_size: int) -> list[float]:
        """Each expert-parallel rank's share: the sum over the experts it holds."""
        per = self.num_experts // ep_size
        loads = self.loads
        return [sum(loads[r * per : (r + 1) * per]) for r in range(ep_size)]

    def reader(self, ep_size: int, ep_rank: int) -> SplitReader:
        return SplitReader(self, ep_size, ep_rank)


class SplitReader:
    """The seam's answers for one rank of an expert-parallel group of `ep_size`."""

    def __init__(self, routing: AssumedRouting, ep_size: int, ep_rank: int) -> None:
        self.routing, self.ep_size, self.ep_rank = routing, ep_size, ep_rank
        self.calls = 0

    def __call__(self, counts: torch.Tensor, rows: int, over: Over) -> list[int]:
        self.calls += 1
        r = self.routing
        if over == "experts":
            loads = r.loads
            if counts.numel() != r.num_experts:  # the experts this rank holds
                per = r.num_experts // self.ep_size
                loads = loads[self.ep_rank * per : (self.ep_rank + 1) * per]
            return split_rows(rows, loads)
        shares = split_rows(rows, r.rank_loads(self.ep_size))
        if over == "ranks_out":
            return shares
        return [shares[self.ep_rank]] * self.ep_size  # every peer sends what this rank would send itself
