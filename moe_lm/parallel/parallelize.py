"""Apply parallelism to a plain single-device model, in one place and in one order.

    1. expert parallelism   shard each MoE layer's experts by EP rank, route tokens by all-to-all
                            (moe_lm/parallel/expert_parallel.py); in place, so parameter groups
                            built before still hold the same Parameter objects
    2. global-batch balance the all-reduce that sums each step's expert counts over the data-
                            parallel ranks (moe_lm/parallel/balance.py), for aux_loss_scope
                            global_batch
    3. activation checkpointing
    4. data parallelism     DDP: experts kept out of its all-reduce and broadcast within their
                            expert-data-parallel group instead; DeepSpeed: MoE markers so the
                            engine builds its expert groups, expert optimizer groups split out
    5. optimizer + wrapping accelerate's `prepare` (DDP module or DeepSpeed engine), LR schedule
    6. torch.compile        of the wrapped model: the module every forward goes through

`build_backend` runs this and returns the backend that steps the result (the one place that
chooses between DDP and DeepSpeed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_lm.config import Config
from moe_lm.libraries import configure_deepspeed
from moe_lm.model import MoETransformer
from moe_lm.model.params import is_expert_param
from moe_lm.parallel.backend import Backend, DDPBackend, Parallelized
from moe_lm.parallel.balance import apply_global_balance
from moe_lm.parallel.deepspeed_backend import DeepSpeedBackend
from moe_lm.parallel.expert_parallel import apply_expert_parallel
from moe_lm.parallel.layout import Layout

ParamGroups = list[dict[str, Any]]
MakeOptimizer = Callable[[ParamGroups], torch.optim.Optimizer]


def parallelize(
    model: MoETransformer,
    cfg: Config,
    layout: Layout,
    param_groups: ParamGroups,
    make_optimizer: MakeOptimizer,
    lr_lambda: Callable[[int], float],
) -> Parallelized:
    ep_stats = apply_expert_parallel(model, layout.mesh)
    apply_global_balance(model, layout.world_size)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    if cfg.parallel.backend == "deepspeed":
        # Imported here so that DDP runs never load deepspeed (half a second, and its log lines).
        from moe_lm.parallel.deepspeed_moe import mark_moe_layers

        mark_moe_layers(model, layout.mesh)
        param_groups = deepspeed_param_groups(param_groups)
    elif layout.mesh.ep_size > 1 and layout.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Each rank holds different experts: DDP must neither broadcast nor average them.
        experts = [n for n, _ in model.named_parameters() if is_expert_param(n)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
        _broadcast_experts(model, layout)
    torch_optimizer = make_optimizer(param_groups)
    wrapped, optimizer = layout.accelerator.prepare(model, torch_optimizer)
    # Under DeepSpeed on the torch optimizer: ZeRO keeps its param-group dicts, so the lr set here is used.
    deepspeed = cfg.parallel.backend == "deepspeed"
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch_optimizer if deepspeed else optimizer, lr_lambda)
    compiled: nn.Module = torch.compile(wrapped) if cfg.train.compile else wrapped  # type: ignore[assignment]
    return Parallelized(compiled, wrapped, model, optimizer, torch_optimizer, scheduler, ep_stats)


def deepspeed_param_groups(param_groups: ParamGroups) -> ParamGroups:
    """The optimizer groups moe_lm hands DeepSpeed: expert parameters (marked by
    apply_expert_parallel) split into groups of their own, which ZeRO partitions over the
    expert-data-parallel group instead of the whole world (`"moe": True`)."""
    configure_deepspeed()  # before DeepSpeed's first import (a plan imports it here first)
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    # DeepSpeed keys MoE optimizer groups by group name; then drops groups emptied by the split.
    named = [{"name": g.get("name", f"group{i}"), **g} for i, g in enumerate(param_groups)]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]


@torch.no_grad()
def _broadcast_experts(model: nn.Module, layout: Layout) -> None:
    # DDP's initial broadcast makes dense weights agree whatever each rank's seed was; do the
    # same for experts within the group of ranks that hold them.
    mesh = layout.mesh
    if mesh.edp_group is None:
        return
    for name, p in model.named_parameters():
        if is_expert_param(name):
            data = p.data.to(layout.device)
            dist.broadcast(data, src=mesh.edp_ranks[0], group=mesh.edp_group)
            p.data.copy_(data)


def build_backend(
    cfg: Config,
    layout: Layout,
    model: MoETransformer,
    param_groups: ParamGroups,
    make_optimizer: MakeOptimizer,
    lr_lambda: Callable[[int], float],
) -> Backend:
    """Parallelize `model` and return the backend that steps it: DeepSpeed or DDP, as configured."""
    parts = parallelize(model, cfg, layout, param_groups, make_optimizer, lr_lambda)
    if cfg.parallel.backend == "deepspeed":
        return DeepSpeedBackend(layout, parts)
    return DDPBackend(layout, parts)
