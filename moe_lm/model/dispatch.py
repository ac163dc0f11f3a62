"""TokenDispatcher seam: the only place expert parallelism touches the MoE layer.

A dispatcher takes tokens, their chosen experts and gate weights, runs the experts and returns the
weighted combination. `LocalDispatcher` does it in one process; `moe_lm.parallel` supplies an
all-to-all one with the same call signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moe_lm.model.experts import Experts


@dataclass
class RoutePlan:
    """Expert-sorted (token, slot) assignments that survive the capacity limit."""

    order: torch.Tensor  # indices into the slot-major flattening [K*T] of topk_idx, sorted by expert
    token_idx: torch.Tensor  # which token each sorted row comes from
    counts_E: torch.Tensor  # rows kept per expert (what the experts compute)
    dropped: torch.Tensor  # number of (token, slot) assignments dropped by capacity (0-d, long)


def plan_routing(topk_idx_TK: torch.Tensor, num_experts: int, capacity: int | None) -> RoutePlan:
    """One stable sort by expert. Slot-major order means that under a capacity limit every token's
    first choice is served before anyone's second choice, and earlier tokens before later ones."""
    num_tokens = topk_idx_TK.shape[0]
    expert_S = topk_idx_TK.t().reshape(-1)
    order = torch.argsort(expert_S, stable=True)
    counts_E = torch.bincount(expert_S, minlength=num_experts)
    dropped = torch.zeros((), dtype=torch.long, device=expert_S.device)
    if capacity is not None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts_E[expert_S[order]]
        keep = rank_in_expert < capacity
        dropped = (~keep).sum()
        order = order[keep]
        counts_E = counts_E.clamp(max=capacity)
    return RoutePlan(order=order, token_idx=order % num_tokens, counts_E=counts_E, dropped=dropped)


def combine(
    y_SH: torch.Tensor, plan: RoutePlan, topk_weight_TK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Scale each expert output by its gate weight and sum the k outputs of every token."""
    weight_S = topk_weight_TK.t().reshape(-1)[plan.order].to(y_SH.dtype)
    out_TH = y_SH.new_zeros(num_tokens, y_SH.shape[-1])
    return out_TH.index_add_(0, plan.token_idx, y_SH * weight_S[:, None])


class TokenDispatcher(Protocol):
    def __call__(
        self,
        x_TH: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_weight_TK: torch.Tensor,
        experts: Experts,
        num_experts: int,
        capacity: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (combined expert output [T, H], dropped assignment count)."""
        ...


class LocalDispatcher:
    """All experts live in this process: sort, compute, weight, scatter back."""

    def __call__(
        self,
        x_TH: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_weight_TK: torch.Tensor,
        experts: Experts,
        num_experts: int,
        capacity: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = plan_routing(topk_idx_TK, num_experts, capacity)
        if isinstance(experts, Experts):
            # Gather, experts and weighted combine in one Function: the least saved for backward.
            weight_S = topk_weight_TK.t().reshape(-1)[plan.order]
            return experts.forward_combined(x_TH, plan.token_idx, plan.counts_E, weight_S), plan.dropped
        y_SH = experts(x_TH[plan.token_idx], plan.counts_E)
        return combine(y_SH, plan, topk_weight_TK, x_TH.shape[0]), plan.dropped
