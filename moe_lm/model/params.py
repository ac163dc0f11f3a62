"""What a parameter is, by name: which ones are routed experts; counts per component.

The names come from the model's module tree (`layers.L.ffn.experts.gate_up_proj` is
`MoETransformer.layers[L].ffn.experts`), so the one answer to "is this an expert parameter?" lives
here, beside them: freezing, gradient reduction, checkpoint keys and these counts all ask it.
Counts are made on a model built on the meta device, so the real Mixtral 8x7B shape costs no memory.
"""

from __future__ import annotations

from collections import defaultdict

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


def count_params(cfg: ModelConfig) -> dict[str, object]:
    """{"total_params", "active_params", "components": {name: count}} for a config."""
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
    return {"total_params": total, "active_params": total - inactive, "components": dict(components)}


def human(n: int | float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
