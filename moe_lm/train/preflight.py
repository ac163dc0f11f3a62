"""Pre-flight memory check of CPU runs: a formula for what one process needs, warned before step 1.

Finding out at step 1 (or at step 4000, when a long batch arrives) that the model does not fit
wastes a queue slot; one line up front says what to change. GPU runs are checked by the plan
instead (`moe-lm train` rehearses the run's own layout: moe_lm/plan/preflight.py); this formula is
the fallback for CPU runs, where a rehearsal would cost every run seconds and RAM is rarely the
limit. docs/plan.md gives its error against the plan. The estimate is deliberately simple:

  weights     4 B/param (fp32 master weights; autocast keeps them fp32)
  grads       4 B/trainable param          (ZeRO-2: divided by the data-parallel size)
  AdamW       8 B/trainable param (m and v) (ZeRO-1/2: divided by the data-parallel size)
  activations per token and layer, in the autocast dtype:
                attention: 3H + 2·heads·d + 2·kv_heads·d, plus heads·S attention probabilities
                FFN input and residual: 2H
                MoE FFN: k·(2H + 3I) (dispatched copies, gate/up, activation, down) + E router logits
                dense FFN: H + 3I
              times micro_batch × seq_len tokens, plus fp32 logits and their gradient (8·V per token).
              With activation checkpointing: one H-vector per token per layer plus one full layer.
Expert parameters are divided by parallel.ep_size: a process holds E / ep_size experts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_lm.config import Config
from moe_lm.parallel.layout import resolve_precision

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    params: int  # parameters held by one process
    weights: int  # bytes
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


def _activation_elems_per_token(cfg: Config) -> tuple[int, int]:
    """(elements kept for backward per token over all layers, the same for the largest one layer)."""
    m, s = cfg.model, cfg.data.seq_len
    d = m.resolved_head_dim
    attention = 3 * m.hidden_size + 2 * m.num_heads * d + 2 * m.num_kv_heads * d + m.num_heads * s
    moe = m.top_k * (2 * m.hidden_size + 3 * m.expert_intermediate_size) + m.num_experts
    dense = m.hidden_size + 3 * m.intermediate_size
    per_layer = [
        attention + 2 * m.hidden_size + (moe if m.is_moe_layer(i) else dense) for i in range(m.num_layers)
    ]
    return sum(per_layer), max(per_layer)


def estimate_memory(cfg: Config, world_size: int, device_type: str = "cpu") -> MemoryEstimate:
    from moe_lm.model.params import count_params  # builds on the meta device: no memory

    m, p, t = cfg.model, cfg.parallel, cfg.train
    parts = count_params(m).components
    experts = parts.get("experts", 0) // p.ep_size
    dense = sum(n for k, n in parts.items() if k != "experts")
    trainable_experts = experts if t.freeze in ("none", "non_expert", "router") else 0
    trainable_dense = {
        "none": dense,
        "non_expert": 0,
        "experts": dense,
        "router": dense - parts.get("router", 0),
    }[t.freeze]
    # ZeRO partitions dense state over every rank and expert state over the ranks holding the same experts.
    dense_dp = world_size if p.backend == "deepspeed" else 1
    expert_dp = max(world_size // p.ep_size, 1) if p.backend == "deepspeed" else 1
    optimizer = 8 * (
        trainable_dense // (dense_dp if p.zero_stage >= 1 else 1)
        + trainable_experts // (expert_dp if p.zero_stage >= 1 else 1)
    )
    grads = 4 * (
        trainable_dense // (dense_dp if p.zero_stage >= 2 else 1)
        + trainable_experts // (expert_dp if p.zero_stage >= 2 else 1)
    )

    precision = resolve_precision(t.mixed_precision, device_type)
    act_bytes = 4 if precision == "no" else 2
    tokens = t.micro_batch_size * cfg.data.seq_len
    all_layers, one_layer = _activation_elems_per_token(cfg)
    if t.activation_checkpointing:
        all_layers = m.num_layers * m.hidden_size + one_layer
    activations = tokens * all_layers * act_bytes + tokens * m.vocab_size * 8
    return MemoryEstimate(
        params=experts + dense,
        weights=4 * (experts + dense),
        grads=grads,
        optimizer=optimizer,
        activations=activations,
    )


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory(device: torch.device, world_size: int = 1) -> tuple[int, str] | None:
    """(bytes one process may use, where) for the device, or None when it cannot be told."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(total * 0.9), f"{torch.cuda.get_device_name(device)} ({total / GIB:.1f} GiB, 90% usable)"
    try:
        import psutil

        free: int | None = int(psutil.virtual_memory().available)
    except ImportError:
        free = _meminfo_available()
    if free is None:
        return None
    # CPU processes on one machine share its RAM.
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), 1)
    where = "available RAM" + (f" shared by {local} processes" if local > 1 else "")
    return free // local, where


def check_memory(
    cfg: Config, world_size: int, device: torch.device, available: tuple[int, str] | None = None
) -> str | None:
    """Print one warning line (and return it) when the estimate exceeds what the device has."""
    est = estimate_memory(cfg, world_size, device.type)
    have = available if available is not None else available_memory(device, world_size)
    if have is None or est.total <= have[0]:
        return None
    message = (
        f"warning: this config needs about {est.total / GIB:.1f} GiB per process (weights {est.weights / GIB:.1f}, "
        f"grads {est.grads / GIB:.1f}, AdamW {est.optimizer / GIB:.1f}, activations {est.activations / GIB:.1f}) "
        f"but {have[1]} gives {have[0] / GIB:.1f} GiB; lower train.micro_batch_size or data.seq_len, set "
        "train.activation_checkpointing=true, raise parallel.ep_size, or use ZeRO (parallel.backend=deepspeed)"
    )
    print(message, file=sys.stderr, flush=True)
    return message
