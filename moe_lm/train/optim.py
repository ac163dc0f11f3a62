"""AdamW parameter groups, freezing switches and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moe_lm.config import OptimConfig, TrainConfig
from moe_lm.model.params import is_expert_param


def apply_freeze(model: nn.Module, freeze: str) -> None:
    """Fine-tuning switches from the MoE literature: train only experts, only the rest, or all but routers."""
    for name, p in model.named_parameters():
        if freeze == "non_expert":
            p.requires_grad_(is_expert_param(name))
        elif freeze == "experts":
            p.requires_grad_(not is_expert_param(name))
        elif freeze == "router":
            p.requires_grad_(".ffn.router." not in name)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (and stacked expert tensors); never norms, biases or 1-D gains."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def optimizer_factory(cfg: OptimConfig) -> Callable[[list[dict[str, Any]]], torch.optim.Optimizer]:
    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        # The fused kernel: one pass per parameter (7x faster than the default on CPU, see
        # scripts/bench_train.py) and still deterministic, so resumes stay bit-identical.
        return torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=True,
        )

    return make


def lr_lambda(optim: OptimConfig, train: TrainConfig) -> Callable[[int], float]:
    """Multiplier of optim.lr at a step: linear warm-up, then cosine/linear decay to min_lr_ratio."""
    warmup, total, floor = optim.warmup_steps, train.max_steps, optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if optim.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
