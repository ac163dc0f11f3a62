"""E SwiGLU experts as stacked weights, computed over tokens already sorted by expert.

Weights use transformers' in-memory Mixtral layout so conversion is a rename:
gate_up_proj [E, 2I, H] (first I rows gate, next I up), down_proj [E, H, I].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _grouped_mm_available(x: torch.Tensor) -> bool:
    # torch's grouped GEMM is one kernel on CUDA (bf16); on CPU it is a loop of GEMMs that saves
    # more for backward than _LoopExperts does, so the hand-written loop is used there.
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def _silu_mul(h_N2I: torch.Tensor, inter: int) -> torch.Tensor:
    return F.silu(h_N2I[:, :inter]) * h_N2I[:, inter:]


class _LoopExperts(torch.autograd.Function):
    """Per-expert GEMMs on contiguous row blocks, with a hand-written backward.

    Why not autograd through `w[e]` slices: every `w[e]` is a SelectBackward whose gradient is a
    zero-filled [E, ...] tensor per expert (E full-size memsets per weight per layer). Here each
    expert's weight gradient is written straight into its slice of one buffer. Only x and the
    gate/up pre-activation are saved; silu(gate) * up is recomputed in backward (one elementwise
    pass), which saves the [N, I] activation and the [N, I] silu output autograd would keep.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_NH: torch.Tensor, w_gu_E2IH: torch.Tensor, w_down_EHI: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        inter = w_down_EHI.shape[-1]
        h_N2I = x_NH.new_empty(x_NH.shape[0], 2 * inter)
        y_NH = x_NH.new_empty(x_NH.shape)
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x_NH[start : start + n], w_gu_E2IH[e].t(), out=h_N2I[start : start + n])
            start += n
        act_NI = _silu_mul(h_N2I, inter)  # one elementwise pass over all experts at once
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(act_NI[start : start + n], w_down_EHI[e].t(), out=y_NH[start : start + n])
            start += n
        ctx.save_for_backward(x_NH, h_N2I, w_gu_E2IH, w_down_EHI)
        ctx.counts = counts
        return y_NH

    @staticmethod
    def backward(ctx: Any, dy_NH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_NH, h_N2I, w_gu_E2IH, w_down_EHI = ctx.saved_tensors
        counts: list[int] = ctx.counts
        inter = w_down_EHI.shape[-1]
        dy_NH = dy_NH.contiguous()
        gate_NI, up_NI = h_N2I[:, :inter], h_N2I[:, inter:]
        silu_NI = F.silu(gate_NI)
        act_NI = silu_NI * up_NI
        # d(act) per expert, and the down-projection weight gradient.
        dact_NI = torch.empty_like(act_NI)
        dw_down = torch.empty_like(w_down_EHI)
        start = 0
        for e, n in enumerate(counts):
            rows = slice(start, start + n)
            if n:
                torch.mm(dy_NH[rows], w_down_EHI[e], out=dact_NI[rows])
                torch.mm(dy_NH[rows].t(), act_NI[rows], out=dw_down[e])
            else:
                dw_down[e].zero_()
            start += n
        # SwiGLU backward, written into the two halves of one [N, 2I] buffer.
        dh_N2I = torch.empty_like(h_N2I)
        torch.mul(dact_NI, silu_NI, out=dh_N2I[:, inter:])
        dact_NI.mul_(up_NI)
        torch.ops.aten.silu_backward.grad_input(dact_NI, gate_NI, grad_input=dh_N2I[:, :inter])
        dx_NH = torch.empty_like(x_NH) if ctx.needs_input_grad[0] else None
        dw_gu = torch.empty_like(w_gu_E2IH)
        start = 0
        for e, n in enumerate(counts):
            rows = slice(start, start + n)
            if n:
                torch.mm(dh_N2I[rows].t(), x_NH[rows], out=dw_gu[e])
                if dx_NH is not None:
                    torch.mm(dh_N2I[rows], w_gu_E2IH[e], out=dx_NH[rows])
            else:
                dw_gu[e].zero_()
            start += n
        return dx_NH, dw_gu, dw_down, None


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, impl: str = "auto") -> None:
        super().__init__()
        self.num_experts = num_experts  # experts held here (num_experts / ep_size under EP)
        self.intermediate_size = intermediate_size
        self.impl = impl
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_NH: tokens sorted by expert; counts_E: how many rows belong to each expert, in order."""
        use_grouped = self.impl == "grouped_mm" or (self.impl == "auto" and _grouped_mm_available(x_NH))
        if use_grouped:
            return self._grouped(x_NH, counts_E)
        return self._loop(x_NH, counts_E)

    def _loop(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # One host sync for the split sizes; on CPU the loop of contiguous GEMMs beats padding to a
        # batched matmul (see scripts/bench_moe_layer.py).
        counts = counts_E.tolist()
        if sum(counts) != x_NH.shape[0]:
            raise ValueError(f"Experts: counts_E sums to {sum(counts)} but x_NH has {x_NH.shape[0]} rows")
        return _LoopExperts.apply(x_NH.contiguous(), self.gate_up_proj, self.down_proj, counts)

    def _grouped(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts_E, dim=0).to(torch.int32)
        h = torch._grouped_mm(x_NH, self.gate_up_proj.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(
            _silu_mul(h, self.intermediate_size), self.down_proj.transpose(-2, -1), offs=offs
        )
