"""E SwiGLU experts as stacked weights, computed over tokens already sorted by expert.

Weights use transformers' in-memory Mixtral layout so conversion is a rename:
gate_up_proj [E, 2I, H] (first I rows gate, next I up), down_proj [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _grouped_mm_available(x: torch.Tensor) -> bool:
    # torch's grouped GEMM has a backward only on CUDA (bf16); on CPU its weight gradient fails.
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


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

    def _swiglu(self, h_N2I: torch.Tensor) -> torch.Tensor:
        gate, up = h_N2I.split(self.intermediate_size, dim=-1)
        return F.silu(gate) * up

    def _loop(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # One host sync for the split sizes, then one contiguous GEMM pair per expert. On CPU this
        # beats padding to a batched matmul (see scripts/bench_moe_layer.py).
        outs = []
        for e, x_nH in enumerate(torch.split(x_NH, counts_E.tolist())):
            if x_nH.shape[0] == 0:
                continue
            h = self._swiglu(F.linear(x_nH, self.gate_up_proj[e]))
            outs.append(F.linear(h, self.down_proj[e]))
        if not outs:
            return x_NH.new_zeros(x_NH.shape)
        return torch.cat(outs, dim=0)

    def _grouped(self, x_NH: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts_E, dim=0).to(torch.int32)
        h = torch._grouped_mm(x_NH, self.gate_up_proj.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(self._swiglu(h), self.down_proj.transpose(-2, -1), offs=offs)
