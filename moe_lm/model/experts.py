"""E SwiGLU experts as stacked weights, computed over tokens already sorted by expert.

Weights use transformers' in-memory Mixtral layout so conversion is a rename:
gate_up_proj [E, 2I, H] (first I rows gate, next I up), down_proj [E, H, I].

On CPU the experts run as a loop of per-expert GEMMs inside hand-written autograd Functions:
- autograd through `w[e]` slices gives every expert a SelectBackward that zero-fills a full
  [E, ...] gradient (E memsets of the whole weight per weight per layer); here each expert's
  gradient is written straight into its slice of one buffer.
- only the gate/up pre-activation h [N, 2I] is saved; silu(gate) * up is recomputed in backward
  (one elementwise pass), instead of autograd keeping silu(gate) and the product as well.
- `forward_combined` (used by LocalDispatcher) also fuses the gather of tokens and the weighted
  scatter back: it saves neither the gathered input nor the expert output, and works on groups of
  at most GROUP_ROWS rows in small reused buffers, so no [k*T, H] temporary exists at all. Big
  short-lived tensors are expensive on CPU: each one is a fresh mmap whose pages fault in.
- with several torch threads, slices of whole experts run side by side, one thread each
  (expert_threads.py).
On CUDA with bf16, `impl="auto"` takes grouped_experts.py instead: the same memory plan around
`torch._grouped_mm`, one kernel per GEMM. On CPU the loop is the faster of the two at every shape
scripts/bench_peers.py measures, with 1 and 2 threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.model.expert_threads import run_sliced
from moe_lm.model.grouped_experts import grouped_gather_experts_combine
from moe_lm.model.split_sizes import split_sizes


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts' GEMMs run in. Under autocast (the DDP backend's bf16) the layer gets
    fp32 activations and holds fp32 weights, and autocast's dtype is the one meant: torch's grouped
    GEMM is no autocast op, so the grouped path casts to it itself (Experts._cast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _grouped_mm_available(x: torch.Tensor, hidden: int, inter: int) -> bool:
    # torch's grouped GEMM is one kernel on CUDA (bf16); on CPU it is a loop of GEMMs that saves
    # more for backward than the Functions below, so the hand-written loop is used there. It needs
    # every row stride to be a multiple of 16 bytes, or it raises: such shapes take the loop too.
    dtype = compute_dtype(x)
    aligned = all((n * dtype.itemsize) % 16 == 0 for n in (hidden, inter, 2 * inter))
    return x.is_cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and aligned


def _silu_mul(h_N2I: torch.Tensor, inter: int) -> torch.Tensor:
    return F.silu(h_N2I[:, :inter]) * h_N2I[:, inter:]


# Rows per pass (at most). Experts sorted next to each other are processed as one group of contiguous rows,
# and an expert with more rows is split over several groups: enough rows that per-op overhead
# (dispatch, OpenMP fork/join) is amortised when experts are small (many experts, few tokens), few
# enough that a group's activations stay in cache between the GEMM that writes them and the
# elementwise passes that read them, and that the scratch buffers stay small and are reused (a big
# short-lived tensor is a fresh mmap whose pages fault in on CPU).
GROUP_ROWS = 1024


@dataclass
class _Group:
    start: int  # first row, in expert-sorted order
    rows: int
    # (expert, first row within the group, rows, whether these are the expert's first rows): an
    # expert's later pieces accumulate into its weight gradient instead of overwriting it.
    experts: list[tuple[int, int, int, bool]]


def _groups(counts: list[int]) -> list[_Group]:
    groups: list[_Group] = []
    start = 0
    for e, n in enumerate(counts):
        pieces = -(-n // GROUP_ROWS)  # equal pieces: no sliver of a few rows with a slow GEMM
        for p in range(pieces):
            take = n * (p + 1) // pieces - n * p // pieces
            if not groups or groups[-1].rows + take > GROUP_ROWS:
                groups.append(_Group(start, 0, []))
            groups[-1].experts.append((e, groups[-1].rows, take, p == 0))
            groups[-1].rows += take
            start += take
    return groups


class _Buffers:
    """Scratch rows sized for the largest group and reused by every group."""

    def __init__(self, like: torch.Tensor, rows: int, hidden: int, inter: int) -> None:
        self.a_nH, self.b_nH = like.new_empty(rows, hidden), like.new_empty(rows, hidden)
        self.silu_nI, self.act_nI, self.dact_nI = (like.new_empty(rows, inter) for _ in range(3))
        self.dh_n2I = like.new_empty(rows, 2 * inter)


def _group_forward(
    grp: _Group, x_nH: torch.Tensor, w_gu: torch.Tensor, w_down: torch.Tensor, h_n2I: torch.Tensor,
    act_nI: torch.Tensor, y_nH: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """y = down(silu(gate) * up) for a group's rows; h (saved for backward) and y written in place."""
    inter = act_nI.shape[-1]
    for e, o, n, _ in grp.experts:
        torch.mm(x_nH[o : o + n], w_gu[e].t(), out=h_n2I[o : o + n])
    torch.ops.aten.silu.out(h_n2I[:, :inter], out=act_nI).mul_(h_n2I[:, inter:])
    for e, o, n, _ in grp.experts:
        torch.mm(act_nI[o : o + n], w_down[e].t(), out=y_nH[o : o + n])
    return y_nH


def _into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """out = a @ b for an expert's first rows, out += a @ b for the rest."""
    if first:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


def _group_backward(
    grp: _Group, g_nH: torch.Tensor, x_nH: torch.Tensor | None, h_n2I: torch.Tensor, w_gu: torch.Tensor,
    w_down: torch.Tensor, buf: _Buffers, weight_n1: torch.Tensor | None, dweight_n: torch.Tensor | None,
    dw_gu: torch.Tensor | None, dw_down: torch.Tensor | None, dx_nH: torch.Tensor | None,
) -> None:  # fmt: skip
    """Gradients for a group's rows, optionally with outputs scaled by per-row gate weights.

    x_nH is only read when dw_gu is asked for; g_nH may be the same memory as dx_nH (it is read
    for the last time before dx is written).
    """
    inter, m = buf.act_nI.shape[-1], grp.rows
    silu, act, dact, dh = buf.silu_nI[:m], buf.act_nI[:m], buf.dact_nI[:m], buf.dh_n2I[:m]
    torch.ops.aten.silu.out(h_n2I[:, :inter], out=silu)
    torch.mul(silu, h_n2I[:, inter:], out=act)  # recomputed instead of saved
    for e, o, n, _ in grp.experts:
        torch.mm(g_nH[o : o + n], w_down[e], out=dact[o : o + n])  # gradient of the unweighted activation
    if dweight_n is not None:
        # d out / d weight_s = <g_s, y_s> = <g_s @ W_down, act_s>: y itself is never kept.
        torch.linalg.vecdot(dact, act, out=dweight_n)
    if weight_n1 is not None:
        act.mul_(weight_n1)
        dact.mul_(weight_n1)
    if dw_down is not None:
        for e, o, n, first in grp.experts:
            _into(dw_down[e], g_nH[o : o + n].t(), act[o : o + n], first)
    # SwiGLU backward into the two halves of dh.
    torch.mul(dact, silu, out=dh[:, inter:])
    dact.mul_(h_n2I[:, inter:])
    torch.ops.aten.silu_backward.grad_input(dact, h_n2I[:, :inter], grad_input=dh[:, :inter])
    for e, o, n, first in grp.experts:
        if dw_gu is not None:
            assert x_nH is not None
            _into(dw_gu[e], dh[o : o + n].t(), x_nH[o : o + n], first)
        if dx_nH is not None:
            torch.mm(dh[o : o + n], w_gu[e], out=dx_nH[o : o + n])


def _grad_buffers(
    ctx: Any, w_gu: torch.Tensor, w_down: torch.Tensor, counts: list[int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight-gradient buffers for the weights that need one; experts without rows get zeros."""
    grads = []
    for need, w in zip(ctx.needs_input_grad[1:3], (w_gu, w_down)):
        g = torch.empty_like(w) if need else None
        if g is not None:
            for e, n in enumerate(counts):
                if n == 0:
                    g[e].zero_()
        grads.append(g)
    return grads[0], grads[1]


def _max_rows(groups: Sequence[_Group]) -> int:
    return max((g.rows for g in groups), default=0)


def _sliced(
    groups: list[_Group], part: Callable[[Sequence[_Group], torch.Tensor | None], None],
    make_acc: Callable[[], torch.Tensor | None], device: torch.device,
) -> torch.Tensor | None:  # fmt: skip
    """part over all groups; on CPU with several threads, slices of whole experts side by side."""
    if device.type != "cpu":
        acc = make_acc()
        part(groups, acc)
        return acc
    starts = [g.experts[0][3] for g in groups]  # a cut here keeps every expert in one slice
    return run_sliced(groups, starts, [g.rows for g in groups], part, make_acc)


class _LoopExperts(torch.autograd.Function):
    """y_NH = experts(x_NH) for rows sorted by expert; saves x and h."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_NH: torch.Tensor, w_gu_E2IH: torch.Tensor, w_down_EHI: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        inter = w_down_EHI.shape[-1]
        groups = _groups(counts)
        h_N2I = x_NH.new_empty(x_NH.shape[0], 2 * inter)
        y_NH = x_NH.new_empty(x_NH.shape)

        def part(gs: Sequence[_Group], _: torch.Tensor | None) -> None:
            act_nI = x_NH.new_empty(_max_rows(gs), inter)
            for g in gs:
                rows = slice(g.start, g.start + g.rows)
                _group_forward(
                    g, x_NH[rows], w_gu_E2IH, w_down_EHI, h_N2I[rows], act_nI[: g.rows], y_NH[rows]
                )

        _sliced(groups, part, lambda: None, x_NH.device)
        ctx.save_for_backward(x_NH, h_N2I, w_gu_E2IH, w_down_EHI)
        ctx.counts = counts
        return y_NH

    @staticmethod
    def backward(ctx: Any, dy_NH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_NH, h_N2I, w_gu, w_down = ctx.saved_tensors
        counts: list[int] = ctx.counts
        groups = _groups(counts)
        dy_NH = dy_NH.contiguous()
        dx_NH = torch.empty_like(x_NH) if ctx.needs_input_grad[0] else None
        dw_gu, dw_down = _grad_buffers(ctx, w_gu, w_down, counts)

        def part(gs: Sequence[_Group], _: torch.Tensor | None) -> None:
            buf = _Buffers(x_NH, _max_rows(gs), 0, w_down.shape[-1])
            for g in gs:
                rows = slice(g.start, g.start + g.rows)
                _group_backward(
                    g, dy_NH[rows], x_NH[rows], h_N2I[rows], w_gu, w_down, buf, None, None, dw_gu, dw_down,
                    None if dx_NH is None else dx_NH[rows],
                )  # fmt: skip

        _sliced(groups, part, lambda: None, x_NH.device)
        return dx_NH, dw_gu, dw_down, None


class _GatherExpertsCombine(torch.autograd.Function):
    """out_TH[t] = sum over sorted rows s of token t: weight_S[s] * expert_s(x_TH[t]).

    Saves x_TH (the router keeps it anyway), h [S, 2I] and the small index/weight vectors.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_TH: torch.Tensor,
        w_gu_E2IH: torch.Tensor,
        w_down_EHI: torch.Tensor,
        weight_S: torch.Tensor,
        token_idx_S: torch.Tensor,
        counts: list[int],
    ) -> torch.Tensor:
        inter = w_down_EHI.shape[-1]
        groups = _groups(counts)
        h_S2I = x_TH.new_empty(token_idx_S.shape[0], 2 * inter)
        w_S1 = weight_S.to(x_TH.dtype)[:, None]

        def part(gs: Sequence[_Group], out_TH: torch.Tensor | None) -> None:
            assert out_TH is not None
            buf = _Buffers(x_TH, _max_rows(gs), x_TH.shape[-1], inter)
            for g in gs:
                rows, m = slice(g.start, g.start + g.rows), g.rows
                x_n = torch.index_select(x_TH, 0, token_idx_S[rows], out=buf.a_nH[:m])
                y_n = _group_forward(g, x_n, w_gu_E2IH, w_down_EHI, h_S2I[rows], buf.act_nI[:m], buf.b_nH[:m])
                out_TH.index_add_(0, token_idx_S[rows], y_n.mul_(w_S1[rows]))

        out_TH = _sliced(groups, part, lambda: torch.zeros_like(x_TH), x_TH.device)
        assert out_TH is not None
        ctx.save_for_backward(x_TH, w_gu_E2IH, w_down_EHI, weight_S, token_idx_S, h_S2I)
        ctx.counts = counts
        return out_TH

    @staticmethod
    def backward(ctx: Any, g_TH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_TH, w_gu, w_down, weight_S, token_idx_S, h_S2I = ctx.saved_tensors
        counts: list[int] = ctx.counts
        groups = _groups(counts)
        g_TH = g_TH.contiguous()
        dw_gu, dw_down = _grad_buffers(ctx, w_gu, w_down, counts)
        dweight_S = x_TH.new_empty(weight_S.shape) if ctx.needs_input_grad[3] else None
        w_S1 = weight_S.to(x_TH.dtype)[:, None]

        def part(gs: Sequence[_Group], dx_TH: torch.Tensor | None) -> None:
            buf = _Buffers(x_TH, _max_rows(gs), x_TH.shape[-1], w_down.shape[-1])
            for g in gs:
                rows, m = slice(g.start, g.start + g.rows), g.rows
                idx = token_idx_S[rows]
                g_n = torch.index_select(g_TH, 0, idx, out=buf.a_nH[:m])
                x_n = None if dw_gu is None else torch.index_select(x_TH, 0, idx, out=buf.b_nH[:m])
                _group_backward(
                    g, g_n, x_n, h_S2I[rows], w_gu, w_down, buf, w_S1[rows],
                    None if dweight_S is None else dweight_S[rows], dw_gu, dw_down,
                    None if dx_TH is None else g_n,  # dx rows overwrite g rows, then scatter-add
                )  # fmt: skip
                if dx_TH is not None:
                    dx_TH.index_add_(0, idx, g_n)

        need_dx = ctx.needs_input_grad[0]
        dx_TH = _sliced(groups, part, lambda: torch.zeros_like(x_TH) if need_dx else None, x_TH.device)
        if dweight_S is not None:
            dweight_S = dweight_S.to(weight_S.dtype)
        return dx_TH, dw_gu, dw_down, dweight_S, None, None


def _counts(counts_E: torch.Tensor, rows: int) -> list[int]:
    # The one host sync of the loop path: the split sizes, through the routing counts' seam.
    counts = split_sizes(counts_E, rows, "experts")
    if sum(counts) != rows:
        raise ValueError(f"Experts: counts_E sums to {sum(counts)} but there are {rows} rows")
    return counts


# Data-dependent Python loops: torch.compile would specialise (and recompile) on every new set of
# counts, so the loop paths always run eagerly; the rest of the model still compiles around them.
@torch.compiler.disable
def _loop_experts(
    x_NH: torch.Tensor, w_gu: torch.Tensor, w_down: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    return _LoopExperts.apply(x_NH.contiguous(), w_gu, w_down, _counts(counts_E, x_NH.shape[0]))


@torch.compiler.disable
def _gather_experts_combine(
    x_TH: torch.Tensor, w_gu: torch.Tensor, w_down: torch.Tensor, weight_S: torch.Tensor,
    token_idx_S: torch.Tensor, counts_E: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    counts = _counts(counts_E, token_idx_S.shape[0])
    return _GatherExpertsCombine.apply(x_TH.contiguous(), w_gu, w_down, weight_S, token_idx_S, counts)


class Experts(nn.Module):
    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto"
    ) -> None:
        super().__init__()
        self.num_experts = num_experts  # experts held here (num_experts / ep_size under EP)
        self.intermediate_size = intermediate_size
        self.impl = impl
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        hidden = self.gate_up_proj.shape[-1]
        return self.impl == "grouped_mm" or (
            self.impl == "auto" and _grouped_mm_available(x, hidden, self.intermediate_size)
        )

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_NH: tokens sorted by expert; counts_E: how many rows belong to each expert, in order."""
        if self.uses_grouped_mm(x_NH):
            return self._grouped(*self._cast(x_NH), counts_E)
        return _loop_experts(x_NH, self.gate_up_proj, self.down_proj, counts_E)

    def _cast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x and both weights in the compute dtype (no copy when they already are)."""
        dtype = compute_dtype(x)
        return x.to(dtype), self.gate_up_proj.to(dtype), self.down_proj.to(dtype)

    def forward_combined(
        self, x_TH: torch.Tensor, token_idx_S: torch.Tensor, counts_E: torch.Tensor, weight_S: torch.Tensor
    ) -> torch.Tensor:
        """Gather -> experts -> weighted scatter-add, in one Function (see module doc).

        Equals `zeros(T, H).index_add_(0, token_idx_S, forward(x_TH[token_idx_S], counts_E) * weight_S)`.
        """
        if self.uses_grouped_mm(x_TH):
            x, w_gu, w_down = self._cast(x_TH)
            return grouped_gather_experts_combine(x, w_gu, w_down, weight_S, token_idx_S, counts_E)
        return _gather_experts_combine(
            x_TH, self.gate_up_proj, self.down_proj, weight_S, token_idx_S, counts_E
        )

    def _grouped(
        self, x_NH: torch.Tensor, w_gu: torch.Tensor, w_down: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        offs = torch.cumsum(counts_E, dim=0).to(torch.int32)
        h = torch._grouped_mm(x_NH, w_gu.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(_silu_mul(h, self.intermediate_size), w_down.transpose(-2, -1), offs=offs)
