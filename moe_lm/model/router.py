"""Top-k router with Mixtral semantics: fp32 softmax over all experts, top-k, renormalised."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor  # fp32
    probs_TE: torch.Tensor  # fp32 softmax over all experts
    topk_idx_TK: torch.Tensor  # chosen experts, best first
    topk_weight_TK: torch.Tensor  # fp32, sums to 1 over k


class Router(nn.Module):
    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, jitter: float = 0.0, aux_free_bias: bool = False
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter = jitter
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # DeepSeek-V3 balancing: a bias that only affects which experts are picked, never the
        # gate values; updated outside autograd from the observed load (see update_bias).
        self.expert_bias: torch.Tensor | None
        if aux_free_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x_TH: torch.Tensor) -> RouterOutput:
        if self.training and self.jitter > 0:
            x_TH = x_TH * torch.empty_like(x_TH).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        # Routing decisions are made in fp32: bf16 logits flip near-tied top-k choices.
        logits_TE = F.linear(x_TH.float(), self.weight.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.expert_bias is None:
            topk_weight_TK, topk_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        else:
            _, topk_idx_TK = torch.topk(probs_TE + self.expert_bias, self.top_k, dim=-1)
            topk_weight_TK = probs_TE.gather(1, topk_idx_TK)
        topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, probs_TE, topk_idx_TK, topk_weight_TK)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor, rate: float) -> None:
        """b_i <- b_i - rate * sign(load_i - mean load): overloaded experts become less likely."""
        if self.expert_bias is None:
            return
        load_E = counts_E.float().to(self.expert_bias.device)
        self.expert_bias -= rate * torch.sign(load_E - load_E.mean())
