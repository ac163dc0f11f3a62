"""The parts of a step that cannot run on fake tensors, computed from the parameters instead.

- DDP (world > 1): torch's DDP reads parameter data when it is built. It all-reduces the fp32
  gradients of the parameters it manages (every trainable one except, under expert parallelism,
  the experts, which moe_lm reduces itself) once per optimizer step, and keeps them in buckets of
  their own besides `.grad` (`gradient_as_bucket_view=False`, torch's default, which accelerate
  keeps): one more fp32 copy of those gradients.
- DeepSpeed ZeRO-1/2: the engine partitions each optimizer group over its data-parallel group
  (dense groups over the world, expert groups over the expert-data-parallel group, as
  `deepspeed_param_groups` splits them): per rank ceil(n / dp) elements of fp32 master weights and
  two fp32 AdamW moments (the "optimizer" row) and of fp32 averaged gradients. ZeRO-1 keeps every
  bf16 gradient until the step (measured in the rehearsal) and one reduce bucket; ZeRO-2 frees each
  gradient into a reduce bucket as it is ready, so the bf16 gradients are replaced by the buckets:
  two (overlap_comm on GPUs). A bucket is reduce_bucket_size = 5e8 bf16 elements, DeepSpeed's
  default, whatever the model's size. Traffic: the bf16 gradients
  reduce-scattered and the updated bf16 partitions all-gathered.
- The checkpoint: bytes of what `Backend.model_state` / `optimizer_state` return, as the writer
  stores them (fp32), for the files this rank writes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from moe_lm.config import Config
from moe_lm.model.params import is_expert_param
from moe_lm.parallel.backend import Backend

REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default


@dataclass
class Extras:
    memory: dict[str, int] = field(default_factory=dict)  # category -> bytes to add (may be negative)
    traffic: Counter[str] = field(default_factory=Counter)  # kind -> bytes this rank sends per step
    overlapped: Counter[str] = field(default_factory=Counter)  # of traffic, what overlaps the backward
    zero_partition: int = 0  # elements of this rank's ZeRO partitions
    notes: list[str] = field(default_factory=list)


def _full_model(cfg: Config) -> tuple[Any, list[dict[str, Any]]]:
    """The whole model on the meta device as this rank holds it (experts sharded and marked by
    moe_lm's own expert parallelism) and the optimizer groups moe_lm builds for it. Inside a
    (fake) process group of the job's size."""
    from moe_lm.model.params import build_meta_model
    from moe_lm.parallel.expert_parallel import apply_expert_parallel
    from moe_lm.parallel.mesh import build_mesh
    from moe_lm.train.optim import apply_freeze, param_groups

    model = build_meta_model(cfg.model)
    apply_freeze(model, cfg.train.freeze)
    apply_expert_parallel(model, build_mesh(cfg.parallel.ep_size, cfg.model.num_experts))
    return model, param_groups(model, cfg.optim.weight_decay)


def zero_partitions(groups: list[dict[str, Any]], world_size: int, ep_size: int) -> tuple[int, int]:
    """(elements of this rank's ZeRO partitions summed over the groups moe_lm hands DeepSpeed,
    elements of those groups)."""
    from moe_lm.parallel.parallelize import deepspeed_param_groups

    mine = total = 0
    for group in deepspeed_param_groups(groups):
        n = sum(p.numel() for p in group["params"])
        dp = world_size // ep_size if group.get("moe") else world_size
        mine += math.ceil(n / dp)
        total += n
    return mine, total


def data_parallel_extras(cfg: Config, world_size: int) -> Extras:
    """Memory and traffic of the data-parallel machinery that cannot run on fake tensors."""
    p = cfg.parallel
    out = Extras()
    model, groups = _full_model(cfg)
    if p.backend == "ddp":
        if world_size > 1:
            managed = sum(
                q.numel()
                for n, q in model.named_parameters()
                if q.requires_grad and not (p.ep_size > 1 and is_expert_param(n))
            )
            out.memory["gradients"] = 4 * managed
            out.traffic["all_reduce"] += 4 * managed
            out.overlapped["all_reduce"] += 4 * managed  # bucketed during the backward
            out.notes.append(
                f"DDP gradient all-reduce and buckets: arithmetic on the {managed:,} parameters DDP manages"
            )
        return out
    mine, total = zero_partitions(groups, world_size, p.ep_size)
    out.zero_partition = mine
    out.memory["optimizer"] = 12 * mine  # fp32 master weights + AdamW exp_avg, exp_avg_sq
    out.memory["gradients"] = 4 * mine  # fp32 averaged gradients of the partition
    out.traffic["reduce_scatter"] += 2 * total
    if p.zero_stage >= 2:
        out.overlapped["reduce_scatter"] += 2 * total  # overlap_comm: buckets reduced during the backward
    out.traffic["all_gather"] += 2 * mine
    if p.zero_stage >= 1:
        # DeepSpeed's setup_buckets allocates each bf16 reduce bucket at reduce_bucket_size elements,
        # however few parameters the model has: one under ZeRO-1 (contiguous_gradients, its default,
        # hooks the backward there too), two under ZeRO-2 (overlap_comm, on for GPUs)
        buckets = 2 if p.zero_stage >= 2 else 1
        out.memory["gradients"] += buckets * 2 * REDUCE_BUCKET_ELEMENTS
    out.notes.append(
        f"DeepSpeed ZeRO-{p.zero_stage}: fp32 master weights, AdamW moments, gradient partitions "
        f"({mine:,} of {total:,} parameters on this rank){', reduce buckets' if p.zero_stage >= 2 else ''} "
        "and traffic: arithmetic on the parameter groups moe_lm hands DeepSpeed"
    )
    return out


def checkpoint_sizes(backend: Backend, deepspeed: bool) -> tuple[int, int]:
    """(bytes of the files this rank writes, host bytes the writer holds at once). Rank 0 is
    expert-data-parallel rank 0 (a writer) and expert-parallel rank 0 (it writes the dense weights)."""
    weights = sum(v.numel() * (4 if deepspeed else v.element_size()) for v in backend.model_state().values())
    if deepspeed:  # gathered fp32 AdamW moments of every parameter this rank holds
        moments = 8 * sum(p.numel() for p in backend.raw_model.parameters() if p.requires_grad)
        return weights + moments, weights + moments  # DeepSpeedBackend moves all of it to the host
    state = backend.optimizer_state()
    tensors = [t for entry in state.values() for t in entry.values()]
    optimizer = sum(t.numel() * t.element_size() for t in tensors)
    largest = max((t.numel() * t.element_size() for t in tensors), default=0)
    # save_weights moves every weight to the host at once; torch.save copies one tensor at a time
    return weights + optimizer, weights + largest
