"""Expert parallelism: shard each MoE layer's experts by EP rank and move tokens by all-to-all.

`apply_expert_parallel(model, mesh)` keeps experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of every MoE
layer and swaps in `AllToAllDispatcher`, the only place EP touches the layer. Routing is planned
over the global experts with the capacity computed from this rank's tokens, exactly as
`LocalDispatcher` does, so ep ranks together compute what one process computes when it runs
each rank's tokens as a separate micro-batch.

One forward of a layer, T tokens here, E global experts, E_l = E/ep local ones:
  plan (sort by global expert == by destination rank) -> exchange per-expert counts [ep, E_l]
  -> all-to-all the token rows (uneven splits) -> regroup rows from (source, expert) order to
  (expert, source) order -> experts(x, counts per local expert) -> undo the regrouping ->
  reverse all-to-all -> combine with the gate weights.
The row all-to-alls are differentiable (the backward is the opposite exchange).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from moe_lm.model import MoETransformer
from moe_lm.model.dispatch import combine, plan_routing
from moe_lm.model.experts import Experts, compute_dtype
from moe_lm.model.split_sizes import split_sizes
from moe_lm.parallel.mesh import Mesh


@dataclass
class EPStats:
    """Counters since the last `reset()`, summed over MoE layers and micro-batches."""

    tokens_received: int = 0  # (token, slot) rows this rank's experts computed
    a2a_seconds: float = 0.0  # wall time inside the row all-to-alls, forward and backward
    _cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def reset(self) -> None:
        self.tokens_received, self.a2a_seconds = 0, 0.0
        self._cuda_events.clear()

    def a2a_time(self) -> float:
        """Seconds; on CUDA the collectives are asynchronous, so they are timed with events."""
        if self._cuda_events:
            self._cuda_events[-1][1].synchronize()
            self.a2a_seconds += sum(s.elapsed_time(e) for s, e in self._cuda_events) / 1000.0
            self._cuda_events.clear()
        return self.a2a_seconds


def _exchange(
    x: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup,
    stats: EPStats | None,
) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    if stats is None:
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    elif x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        end.record()
        stats._cuda_events.append((start, end))
    else:
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        stats.a2a_seconds += time.perf_counter() - t0
    return out


class _AllToAll(torch.autograd.Function):
    """Rows out by `in_splits`, rows in by `out_splits`; the gradient travels the opposite way.
    Our own Function rather than `_functional_collectives.all_to_all_single_autograd` so the
    backward exchange is timed too."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: dist.ProcessGroup,
        stats: EPStats | None,
    ) -> torch.Tensor:
        ctx.splits, ctx.group, ctx.stats = (out_splits, in_splits), group, stats
        return _exchange(x, out_splits, in_splits, group, stats)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group, ctx.stats), None, None, None, None


def source_to_expert_order(counts_RE: torch.Tensor, total: int) -> torch.Tensor:
    """Received rows arrive grouped by (source rank, local expert); the experts want them grouped
    by (local expert, source rank). Returns the gather index that reorders them. `total`: the
    number of rows received (counts_RE's sum, already on the host as the receive splits)."""
    ranks, experts = counts_RE.shape
    flat = counts_RE.reshape(-1)
    src_start = (torch.cumsum(flat, 0) - flat).view(ranks, experts).t().reshape(-1)
    counts_ER = counts_RE.t().reshape(-1)
    dst_start = torch.cumsum(counts_ER, 0) - counts_ER
    shift = torch.repeat_interleave(src_start - dst_start, counts_ER, output_size=total)
    return torch.arange(total, device=counts_RE.device) + shift


class AllToAllDispatcher:
    """TokenDispatcher whose experts are spread over the EP group (same call as LocalDispatcher)."""

    def __init__(self, group: dist.ProcessGroup, ep_size: int, stats: EPStats) -> None:
        self.group, self.ep_size, self.stats = group, ep_size, stats

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
        local = num_experts // self.ep_size
        send_counts_RE = plan.counts_E.view(self.ep_size, local)
        recv_counts_RE = torch.empty_like(send_counts_RE)
        dist.all_to_all_single(recv_counts_RE, send_counts_RE, group=self.group)
        # The layer's host syncs, through the routing counts' seam: collectives need the split
        # sizes on the host.
        rows = plan.order.shape[0]
        send_splits = split_sizes(send_counts_RE.sum(1), rows, "ranks_out")
        recv_splits = split_sizes(recv_counts_RE.sum(1), rows, "ranks_in")
        # Training passes only: evaluation and sampling (no grad) would skew the per-step numbers.
        stats = self.stats if torch.is_grad_enabled() else None
        if stats is not None:
            stats.tokens_received += sum(recv_splits)

        x_SH = x_TH[plan.token_idx]
        if experts.uses_grouped_mm(x_TH):
            # The experts compute in autocast's dtype (bf16 on GPUs, where the layer's input is the
            # fp32 residual stream): send the rows in it, half the bytes both ways.
            x_SH = x_SH.to(compute_dtype(x_TH))
        x_recv_NH = _AllToAll.apply(x_SH, recv_splits, send_splits, self.group, stats)
        order_N = source_to_expert_order(recv_counts_RE, sum(recv_splits))
        y_NH = experts(x_recv_NH[order_N], recv_counts_RE.sum(0))
        if x_recv_NH.requires_grad and not y_NH.requires_grad:
            # No rows reached this rank's experts: keep the graph connected so this rank still
            # joins the backward all-to-all its peers are waiting in.
            y_NH = y_NH + x_recv_NH.sum() * 0
        unorder_N = torch.empty_like(order_N)
        unorder_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
        y_SH = _AllToAll.apply(y_NH[unorder_N], send_splits, recv_splits, self.group, stats)
        return combine(y_SH, plan, topk_weight_TK, x_TH.shape[0]), plan.dropped


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed keys its expert process groups and MoE optimizer groups by this name."""
    return f"ep_size_{ep_size}"


@torch.no_grad()
def _shard(experts: Experts, start: int, end: int) -> None:
    # In place, so the Parameter objects (and any param groups already built from them) survive.
    for p in (experts.gate_up_proj, experts.down_proj):
        p.data = p.data[start:end].clone()
    experts.num_experts = end - start


def apply_expert_parallel(model: MoETransformer, mesh: Mesh) -> EPStats:
    """Shard experts by EP rank, mark them for DeepSpeed, and route tokens by all-to-all. Idempotent."""
    existing = getattr(model, "_ep_stats", None)
    if isinstance(existing, EPStats):
        return existing
    stats = EPStats()
    num_experts = model.cfg.num_experts
    start, end = mesh.expert_range(num_experts)
    for layer in model.moe_layers:
        if mesh.ep_size > 1:
            assert mesh.ep_group is not None
            _shard(layer.experts, start, end)
            layer.dispatcher = AllToAllDispatcher(mesh.ep_group, mesh.ep_size, stats)
        for p in layer.experts.parameters():
            if mesh.ep_size > 1:
                # DeepSpeed-MoE's markings: excluded from the dense all-reduce, reduced over the
                # expert-data-parallel group registered under this name.
                p.allreduce = False  # type: ignore[attr-defined]
                p.group_name = expert_group_name(mesh.ep_size)  # type: ignore[attr-defined]
    model._ep_stats = stats  # type: ignore[assignment]
    return stats
