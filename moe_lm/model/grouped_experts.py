"""Gather -> experts -> weighted scatter-add as whole-tensor ops around `torch._grouped_mm`.

The grouped counterpart of experts._GatherExpertsCombine, with the same memory plan: only the
gate/up pre-activation h [S, 2I] is saved (x_TH is kept by the router anyway); the gathered input,
SiLU·up and the expert output are recomputed or never kept, and the gate gradient is ⟨g·W_down, act⟩.
Autograd through `_grouped_mm` would instead keep the gathered input, h, both SwiGLU factors and the
weighted output (torchtitan's and transformers' layers do).

Every GEMM is one `_grouped_mm` call over all experts (one kernel each on CUDA: 2 forward, 4
backward), and every elementwise step is one op over all S rows: few, large ops, where the loop
path issues a few ops per expert. Rows are sorted by expert; `offs_E` holds the cumulative counts.
Weight gradients come from the 2-D x 2-D form, whose groups run along the rows: an expert with no
rows gets a zero gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _gmm(a: torch.Tensor, b: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs_E)


class GroupedGatherExpertsCombine(torch.autograd.Function):
    """out_TH[t] = sum over sorted rows s of token t: weight_S[s] * expert_s(x_TH[t])."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_TH: torch.Tensor,
        w_gu_E2IH: torch.Tensor,
        w_down_EHI: torch.Tensor,
        weight_S: torch.Tensor,
        token_idx_S: torch.Tensor,
        offs_E: torch.Tensor,
    ) -> torch.Tensor:
        inter = w_down_EHI.shape[-1]
        h_S2I = _gmm(x_TH[token_idx_S], w_gu_E2IH.transpose(-2, -1), offs_E)
        act_SI = F.silu(h_S2I[:, :inter]).mul_(h_S2I[:, inter:])
        y_SH = _gmm(act_SI, w_down_EHI.transpose(-2, -1), offs_E)
        del act_SI
        y_SH.mul_(weight_S.to(y_SH.dtype)[:, None])
        out_TH = torch.zeros_like(x_TH).index_add_(0, token_idx_S, y_SH)
        ctx.save_for_backward(x_TH, w_gu_E2IH, w_down_EHI, weight_S, token_idx_S, offs_E, h_S2I)
        return out_TH

    @staticmethod
    def backward(ctx: Any, g_TH: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x_TH, w_gu, w_down, weight_S, token_idx_S, offs_E, h_S2I = ctx.saved_tensors
        inter = w_down.shape[-1]
        w_S1 = weight_S.to(h_S2I.dtype)[:, None]
        g_SH = g_TH.contiguous()[token_idx_S]
        silu_SI = F.silu(h_S2I[:, :inter])
        act_SI = silu_SI * h_S2I[:, inter:]  # recomputed instead of saved
        dact_SI = _gmm(g_SH, w_down, offs_E)  # gradient of the unweighted activation
        dweight_S = None
        if ctx.needs_input_grad[3]:
            dweight_S = torch.linalg.vecdot(dact_SI, act_SI).to(weight_S.dtype)
        dact_SI.mul_(w_S1)
        dw_down = None
        if ctx.needs_input_grad[2]:
            dw_down = _gmm(g_SH.t(), act_SI.mul_(w_S1), offs_E)
        del act_SI, g_SH
        dh_S2I = torch.empty_like(h_S2I)
        torch.mul(dact_SI, silu_SI, out=dh_S2I[:, inter:])
        del silu_SI
        dact_SI.mul_(h_S2I[:, inter:])
        torch.ops.aten.silu_backward.grad_input(dact_SI, h_S2I[:, :inter], grad_input=dh_S2I[:, :inter])
        del dact_SI
        dw_gu = _gmm(dh_S2I.t(), x_TH[token_idx_S], offs_E) if ctx.needs_input_grad[1] else None
        dx_TH = None
        if ctx.needs_input_grad[0]:
            dx_TH = torch.zeros_like(x_TH).index_add_(0, token_idx_S, _gmm(dh_S2I, w_gu, offs_E))
        return dx_TH, dw_gu, dw_down, dweight_S, None, None


def grouped_gather_experts_combine(
    x_TH: torch.Tensor, w_gu_E2IH: torch.Tensor, w_down_EHI: torch.Tensor, weight_S: torch.Tensor,
    token_idx_S: torch.Tensor, counts_E: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """`zeros(T, H).index_add_(0, token_idx_S, experts(x_TH[token_idx_S]) * weight_S)`, grouped."""
    offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
    return GroupedGatherExpertsCombine.apply(  # type: ignore[no-any-return]
        x_TH.contiguous(), w_gu_E2IH, w_down_EHI, weight_S, token_idx_S, offs_E
    )
