"""Process groups for expert parallelism: data-parallel, expert-parallel, expert-data-parallel.

world = dp_per_expert × ep. Every rank reads different data (the data-parallel group is the whole
world); experts are split over EP groups of *consecutive* ranks ([g·ep, (g+1)·ep)) so the
all-to-all stays inside a node; ranks holding the same experts (same ep_rank) form an
expert-data-parallel group that averages those experts' gradients. DeepSpeed's default
(`use_data_before_expert_parallel_=False`) builds the same groups, which the DeepSpeed backend checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from moe_lm.errors import UserError


def expert_parallel_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """EP groups: consecutive blocks of ep_size ranks."""
    return [list(range(g * ep_size, (g + 1) * ep_size)) for g in range(world_size // ep_size)]


def expert_data_parallel_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """EDP groups: the ranks that hold the same experts (same rank within their EP group)."""
    return [list(range(r, world_size, ep_size)) for r in range(ep_size)]


def ep_groups_cross_nodes(world_size: int, ep_size: int, per_node: int) -> bool:
    """Whether an EP group spans two nodes (ranks are numbered node by node, `per_node` each), so
    its all-to-all goes over the network instead of NVLink."""
    groups = expert_parallel_ranks(world_size, ep_size)
    return any(len({r // per_node for r in group}) > 1 for group in groups)


def validate_ep(ep_size: int, world_size: int, num_experts: int) -> None:
    if ep_size < 1:
        raise UserError(f"parallel.ep_size = {ep_size} must be ≥ 1")
    if world_size % ep_size:
        raise UserError(
            f"parallel.ep_size = {ep_size} does not divide the {world_size} launched processes; "
            f"launch a multiple of {ep_size} processes or pick an ep_size that divides {world_size}"
        )
    if num_experts % ep_size:
        raise UserError(
            f"model.num_experts = {num_experts} is not divisible by parallel.ep_size = {ep_size}; "
            "choose an ep_size that divides it"
        )


@dataclass(frozen=True)
class Mesh:
    """This rank's place in the (edp, ep) grid and the groups it belongs to (None: a group of one)."""

    rank: int
    world_size: int
    ep_size: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def ep_ranks(self) -> list[int]:
        return expert_parallel_ranks(self.world_size, self.ep_size)[self.edp_rank]

    @property
    def edp_ranks(self) -> list[int]:
        return expert_data_parallel_ranks(self.world_size, self.ep_size)[self.ep_rank]

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """Global indices [start, end) of the experts this rank holds."""
        per_rank = num_experts // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank


def build_mesh(ep_size: int, num_experts: int) -> Mesh:
    """Create the groups. Collective: every rank must call it, in the same order as other group
    creations, because `new_group` is. A single process gets a mesh with no groups."""
    if not (dist.is_available() and dist.is_initialized()):
        validate_ep(ep_size, 1, num_experts)
        return Mesh(rank=0, world_size=1, ep_size=ep_size, ep_group=None, edp_group=None)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    validate_ep(ep_size, world_size, num_experts)
    ep_group = edp_group = None
    # Separate communicators even when a group spans the whole world: DDP's bucketed all-reduce
    # runs on the default group during backward, interleaved with our all-to-alls.
    if ep_size > 1:
        ep_group, _ = dist.new_subgroups_by_enumeration(expert_parallel_ranks(world_size, ep_size))
        if world_size // ep_size > 1:
            edp_group, _ = dist.new_subgroups_by_enumeration(expert_data_parallel_ranks(world_size, ep_size))
    return Mesh(rank=rank, world_size=world_size, ep_size=ep_size, ep_group=ep_group, edp_group=edp_group)
