"""What a parameter is, by name: which ones are routed experts; counts per component.

The names come from the model's module tree (`layers.L.ffn.experts.gate_up_proj` is
`MoETransformer.layers[L].ffn.experts`), so the one answer to "is this an expert parameter?" lives
here, beside them: freezing, gradient reduction, checkpoint keys and these counts all ask it.
Counts are made on a model built on the meta device, so the real Mixtral 8x7B shape costs no memory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from moe_lm.config import ModelConfig
from moe_lm.model.transformer import MoETransformer

# The routed experts' stacked tensors: [E, 2I, H] and [E, H, I] (moe_lm/model/experts.py).
_EXPERTS = ".ffn.experts."


def is_expert_param(name: str) -> bool:
    """A routed expert's weight, by parameter or state-dict name (any prefix, such as DDP's
    `module.`): stacked in memory (`layers.3.ffn.experts.down_proj`) or one expert per key as
    checkpoints store them (`layers.3.ffn.experts.5.down_proj`). Shared experts are not routed."""
    return _EXPERTS in name


_COMPONENTS = (
    ("router", ".ffn.router."),
    ("shared_experts", ".ffn.shared."),
    ("dense_ffn", ".ffn."),
    ("attention", ".attn."),
    ("norms", "norm"),
    ("embedding", "embed."),
    ("lm_head", "lm_head."),
)


def build_meta_model(cfg: ModelConfig) -> MoETransformer:
    with torch.device("meta"):
        return MoETransformer(cfg)


@dataclass(frozen=True)
class ParamCounts:
    total_params: int
    active_params: int  # per token: k of the E routed experts, everything else
    components: dict[str, int]  # parameters per component (experts, attention, ...), summing to the total


def count_params(cfg: ModelConfig) -> ParamCounts:
    model = build_meta_model(cfg)
    components: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        if is_expert_param(name):
            components["experts"] += p.numel()
            continue
        for component, marker in _COMPONENTS:
            if marker in name:
                components[component] += p.numel()
                break
        else:  # pragma: no cover - a new parameter kind must be given a component
            raise AssertionError(f"parameter {name} has no component")
    total = sum(components.values())
    # Each token runs k of E routed experts; everything else is always active.
    inactive = components["experts"] * (cfg.num_experts - cfg.top_k) // cfg.num_experts
    return ParamCounts(total, total - inactive, dict(components))


@dataclass(frozen=True)
class FlopsPerToken:
    """The dense-equivalent estimate on *active* parameters that `moe-lm info` reports and MFU uses.
    The embedding lookup counts as the matmul it is not, so with untied embeddings this over-counts
    slightly."""

    forward: int  # 2 x active parameters: one multiply-add per weight
    train: int  # 6 x active parameters: the backward pass costs twice the forward
    # The attention score and value matmuls in training, which grow with the context and are in no
    # parameter count: 6 x 2 x layers x heads x head_dim x seq_len, the full causal cost without the
    # 1/2 for the mask, as PaLM's MFU formula (appendix B) counts it.
    attention_train: int

    @property
    def train_total(self) -> int:
        return self.train + self.attention_train


def flops_per_token(cfg: ModelConfig, seq_len: int, active_params: int) -> FlopsPerToken:
    attention = 6 * 2 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
    return FlopsPerToken(forward=2 * active_params, train=6 * active_params, attention_train=attention)


def human(n: int | float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
