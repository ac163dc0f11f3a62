"""MoE feed-forward layer = router + dispatcher + experts (+ optional always-on shared experts)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from moe_lm.config import ModelConfig
from moe_lm.model.balance import StepCounts
from moe_lm.model.dispatch import LocalDispatcher, TokenDispatcher
from moe_lm.model.experts import Experts
from moe_lm.model.layers import SwiGLU
from moe_lm.model.losses import global_load_balance_loss, load_balance_loss, router_entropy, z_loss
from moe_lm.model.router import Router


@dataclass
class MoEStats:
    """What one MoE layer reports for one forward pass (T tokens)."""

    aux_loss: torch.Tensor  # differentiable, Switch form (f over the step with aux_loss_scope global_batch)
    z_loss: torch.Tensor  # differentiable
    counts_E: torch.Tensor  # (token, slot) assignments chosen per expert, before capacity drops
    probs_mean_E: torch.Tensor  # mean router probability per expert (for the transformers-form loss)
    dropped: torch.Tensor  # assignments dropped by capacity
    entropy: torch.Tensor  # mean router entropy over the tokens (nats), detached
    num_tokens: int


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.capacity_factor = cfg.capacity_factor
        self.global_batch_balance = cfg.aux_loss_scope == "global_batch"
        self.router = Router(
            cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.router_jitter, cfg.aux_free_bias
        )
        self.experts = Experts(
            cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size, cfg.experts_impl
        )
        self.shared = (
            SwiGLU(cfg.hidden_size, cfg.expert_intermediate_size * cfg.num_shared_experts)
            if cfg.num_shared_experts
            else None
        )
        # Replaced from outside (moe_lm.parallel) for expert parallelism; the layer never knows.
        self.dispatcher: TokenDispatcher = LocalDispatcher()
        # The model's shared step counts and this layer's index among its MoE layers (set by
        # MoETransformer); used for global-batch balancing in training passes (model/balance.py).
        self.step_counts = StepCounts()
        self.moe_index = 0

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(
        self, x_BTH: torch.Tensor, real_BT: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MoEStats]:
        """real_BT (optional): True at real tokens. Padding is not routed: it takes no expert
        capacity, counts in no router statistic (transformers' masked load-balancing loss does
        the same) and gets no FFN output; nothing attends to it, so real tokens are unaffected."""
        shape = x_BTH.shape
        x_TH = x_BTH.reshape(-1, shape[-1])
        if real_BT is None:
            y_TH, stats = self._route(x_TH)
            return y_TH.view(shape), stats
        real_T = real_BT.reshape(-1).bool()
        y_RH, stats = self._route(x_TH[real_T])
        y_TH = y_RH.new_zeros(x_TH.shape[0], y_RH.shape[-1]).index_put((real_T,), y_RH)
        return y_TH.view(shape), stats

    def _route(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        num_tokens = x_TH.shape[0]
        route = self.router(x_TH)
        y_TH, dropped = self.dispatcher(
            x_TH,
            route.topk_idx_TK,
            route.topk_weight_TK,
            self.experts,
            self.num_experts,
            self.capacity(num_tokens),
        )
        if self.shared is not None:
            y_TH = y_TH + self.shared(x_TH)
        counts_E = torch.bincount(route.topk_idx_TK.reshape(-1), minlength=self.num_experts)
        if self.global_batch_balance and self.training and torch.is_grad_enabled():
            step_counts_E = self.step_counts.counts(self.moe_index, counts_E)
            aux_loss = global_load_balance_loss(route.probs_TE, step_counts_E)
        else:  # per micro-batch; also every pass without autograd (evaluation, the counting pass)
            aux_loss = load_balance_loss(route.probs_TE, counts_E, self.top_k)
        stats = MoEStats(
            aux_loss=aux_loss,
            z_loss=z_loss(route.logits_TE),
            counts_E=counts_E,
            probs_mean_E=route.probs_TE.mean(dim=0),
            dropped=dropped,
            entropy=router_entropy(route.probs_TE),
            num_tokens=num_tokens,
        )
        return y_TH, stats
