"""Router loss formulas as pure functions (T tokens, E experts, k chosen per token, L MoE layers)."""

from __future__ import annotations

import torch


def load_balance_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/Megatron aux loss E * sum_i f_i * P_i; equals 1.0 at perfect balance.

    f_i = tokens routed to expert i / (T * k) is a constant (counts carry no gradient);
    P_i = mean router probability of expert i, through which the gradient flows.
    """
    num_tokens, num_experts = probs_TE.shape
    f_E = counts_E.to(probs_TE.dtype) / max(num_tokens * top_k, 1)
    p_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def global_load_balance_loss(probs_TE: torch.Tensor, step_counts_E: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i with f_i counted over a whole optimizer step (every micro-batch of every
    data-parallel rank: f_i = assignments to expert i / all assignments) and P_i the mean router
    probability over this micro-batch's tokens, through which the gradient flows.

    Averaged over the step's equally sized micro-batches, as the trainer averages losses, this is
    the loss of one process running the whole global batch as one micro-batch.
    """
    num_experts = probs_TE.shape[1]
    counts = step_counts_E.double()
    f_E = (counts / counts.sum().clamp_min(1)).to(probs_TE.dtype)
    return num_experts * torch.sum(f_E * probs_TE.mean(dim=0))


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def hf_load_balance_loss(
    counts_LE: torch.Tensor, probs_mean_LE: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """The value transformers' `load_balancing_loss_func` reports (balanced value = k, not 1).

    It pools all layers: tokens-per-expert fractions over L*T tokens and router probabilities
    averaged over L*T, then E * sum_i f_i * P_i.
    """
    num_layers, num_experts = counts_LE.shape
    f_E = counts_LE.sum(dim=0).to(probs_mean_LE.dtype) / max(num_layers * num_tokens, 1)
    p_E = probs_mean_LE.mean(dim=0)
    return num_experts * torch.sum(f_E * p_E)


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the router distribution's entropy, in nats: ln E when every token is
    spread evenly over the E experts, 0 when every token is certain of one. A health metric (no
    gradient): it falls as routing sharpens; a collapse to a few experts shows in the load instead."""
    return torch.special.entr(probs_TE.detach().float()).sum(dim=-1).mean()


def imbalance(counts_E: torch.Tensor) -> torch.Tensor:
    """max load / mean load: 1.0 is perfect balance, E means every token went to one expert."""
    counts_E = counts_E.float()
    return counts_E.max() / counts_E.mean().clamp_min(1e-9)
