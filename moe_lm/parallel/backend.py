"""Gradient sync and step, and this rank's share of the state on disk: what the trainer drives.

`build_backend` (moe_lm/parallel/parallelize.py) applies parallelism to the model and returns one
of two backends over the result: `DDPBackend` here (accelerate + torch DDP) or `DeepSpeedBackend`
(moe_lm/parallel/deepspeed_backend.py). They differ in how a step syncs gradients and in how full
weights and optimizer state are read out of (and put back into) the optimizer; the step protocol,
metric collectives and the checkpoint files are shared, in `Backend`.

Expert parallelism under DDP (parallel.ep_size > 1): each rank holds E/ep experts; DDP never sees
them (excluded from its all-reduce and its initial broadcast). At the sync step their gradients
are summed over the expert-data-parallel group and divided by the world size, the same
convention DDP uses for the dense weights (average over every rank) and DeepSpeed uses for
experts, so N processes × accum A equal one process running the N·A micro-batches. The clipping
norm is global: dense gradients (identical everywhere) counted once, expert gradients summed over
the EP group.

Checkpoint files (both backends, moe_lm/state): weights and optimizer state by parameter name,
experts by global index; written by expert-data-parallel rank 0 of each EP group, read by every
rank for what it holds, so any EP size and either backend can resume them.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_lm.model import MoETransformer
from moe_lm.model.params import is_expert_param
from moe_lm.parallel.expert_parallel import EPStats
from moe_lm.parallel.layout import Layout
from moe_lm.state.optimizer import (
    NamedState,
    check_optimizer_state,
    load_optimizer_state,
    optimizer_state_keys,
    save_optimizer_state,
)
from moe_lm.state.weights import check_loaded, load_model_state, save_weights


@dataclass(frozen=True)
class Parallelized:
    """What `parallelize` made of a model: what a backend steps."""

    model: nn.Module  # what the forward runs: wrapped (DDP / DeepSpeed engine), maybe compiled
    wrapped: Any  # the DDP module or DeepSpeed engine, not compiled
    raw_model: MoETransformer  # the plain model (this rank's experts), for state and evaluation
    optimizer: torch.optim.Optimizer  # as accelerate wrapped it
    torch_optimizer: torch.optim.Optimizer  # the one we built (DeepSpeed's ZeRO wraps it)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ep_stats: EPStats


class Backend(ABC):
    """The parts both backends share. Subclasses implement the step (`accumulate`, `autocast`,
    `backward`, `step`) and how full state is read out and put back (`model_state`,
    `optimizer_state`, `load_model_state`, `load_optimizer_state`)."""

    def __init__(self, layout: Layout, parts: Parallelized) -> None:
        self.layout = layout
        self.model = parts.model
        self.raw_model = parts.raw_model
        self.optimizer = parts.optimizer
        self.torch_optimizer = parts.torch_optimizer
        self.scheduler = parts.scheduler
        self.ep_stats = parts.ep_stats
        self._steps_since_metrics = 0
        # The process facts the trainer and the checkpoint writer ask the backend for.
        self.device, self.rank, self.world_size = layout.device, layout.rank, layout.world_size
        self.is_main = layout.is_main
        self.dp_rank, self.dp_size = self.rank, self.world_size  # data is sharded over every rank
        self.expert_range = layout.expert_range(self.raw_model.cfg.num_experts)

    # ---- the step ----------------------------------------------------------------------------

    @abstractmethod
    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager[Any]: ...

    @abstractmethod
    def autocast(self) -> contextlib.AbstractContextManager[Any]: ...

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self, max_grad_norm: float) -> tuple[float, bool]:
        """Sync gradients, clip by the global norm and step; a non-finite norm skips the update.
        -> (norm, stepped)."""

    def global_grad_norm(self, params: list[tuple[str, nn.Parameter]]) -> torch.Tensor:
        """The norm of the whole model's gradient from finished (reduced) gradients: dense ones,
        equal on every rank, counted once; expert ones summed over the EP group. Collective
        under expert parallelism."""
        dense = [p.grad for n, p in params if p.grad is not None and not is_expert_param(n)]
        experts = [p.grad for n, p in params if p.grad is not None and is_expert_param(n)]
        sq = torch.zeros(2, dtype=torch.float32, device=self.device)
        if dense:
            sq[0] = torch.nn.utils.get_total_norm(dense).float() ** 2
        if experts:
            sq[1] = torch.nn.utils.get_total_norm(experts).float() ** 2
        mesh = self.layout.mesh
        if mesh.ep_size > 1 and mesh.ep_group is not None:
            part = sq[1:].clone()
            dist.all_reduce(part, group=mesh.ep_group)
            sq[1:] = part
        return sq.sum().sqrt()

    # ---- collectives for metrics --------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.layout.all_reduce(tensor, op)

    def barrier(self, what: str | None = None) -> None:
        self.layout.barrier(what)

    def extra_metrics(self) -> dict[str, Any]:
        """Expert-parallel load since the last call, per optimizer step: rows each rank's experts
        received and seconds spent in the token all-to-alls, as lists indexed by rank. Collective
        (call on every rank, e.g. at each logging step); {} without expert parallelism."""
        if self.layout.mesh.ep_size == 1:
            return {}
        steps = max(self._steps_since_metrics, 1)
        stats = [self.ep_stats.tokens_received / steps, self.ep_stats.a2a_time() / steps]
        mine = torch.tensor(stats, dtype=torch.float64, device=self.device)
        self.ep_stats.reset()
        self._steps_since_metrics = 0
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        tokens = [float(g[0]) for g in gathered]
        mean = sum(tokens) / len(tokens)
        return {
            "ep_tokens_received": tokens,
            "ep_a2a_ms": [1000.0 * float(g[1]) for g in gathered],
            "ep_recv_imbalance": max(tokens) / mean if mean > 0 else 1.0,
        }

    def shutdown(self) -> None:
        self.layout.shutdown()

    # ---- state on disk ------------------------------------------------------------------------

    @abstractmethod
    def model_state(self) -> dict[str, torch.Tensor]:
        """Full-precision weights of this rank's model (experts stacked). Collective."""

    @abstractmethod
    def optimizer_state(self) -> NamedState:
        """Optimizer state by parameter name (experts stacked). Collective."""

    @abstractmethod
    def load_model_state(self, state: dict[str, torch.Tensor]) -> None: ...

    @abstractmethod
    def load_optimizer_state(self, named: NamedState) -> None: ...

    def save_state(self, directory: Path) -> None:
        """This EP rank's share: weights (experts by global index) and optimizer state. Collective:
        call on every rank; expert-data-parallel rank 0 of each EP group writes."""
        weights = self.model_state()
        named = self.optimizer_state()
        mesh = self.layout.mesh
        if mesh.edp_rank != 0:
            return
        save_weights(directory, weights, mesh.ep_rank, mesh.ep_size, self.expert_range[0])
        save_optimizer_state(
            directory, named, self.scheduler.last_epoch, self.expert_range, mesh.ep_rank, mesh.ep_size
        )

    def load_state(self, directory: Path, weights_only: bool = False) -> None:
        """Load what this rank holds from a checkpoint written at any EP size, by either backend."""
        weights = load_model_state(directory, self.expert_range)
        check_loaded(directory, weights, self.raw_model.state_dict())
        self.load_model_state(weights)
        if weights_only:
            return
        named, last_epoch = load_optimizer_state(directory, self.expert_range)
        params = dict(self.raw_model.named_parameters())
        check_optimizer_state(directory, named, params, optimizer_state_keys(self.torch_optimizer))
        self.load_optimizer_state(named)
        self._restore_schedule(last_epoch)

    def _restore_schedule(self, last_epoch: int) -> None:
        # Only the step count travels: the number of param groups differs between backends
        # (DeepSpeed splits out expert groups), and the lr follows from the step.
        sched = self.scheduler
        sched.last_epoch = last_epoch
        lrs = [base * fn(last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs  # type: ignore[attr-defined]


class DDPBackend(Backend):
    """accelerate + torch DDP (or one process); expert gradients reduced here under EP."""

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Micro-steps before the last one of an accumulation skip the gradient all-reduce."""
        if sync or self.world_size == 1:
            return contextlib.nullcontext()
        return self.layout.accelerator.no_sync(self.model)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.layout.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.layout.accelerator.backward(loss)

    def reduce_gradients(self) -> torch.Tensor:
        """Finish this step's gradients (unscale, average expert grads over their expert-data-
        parallel group) and return the global norm. Called by `step`; tests call it to read the
        gradients one process would have. Collective under expert parallelism."""
        self.layout.accelerator.unscale_gradients()
        params = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]
        if self.layout.mesh.ep_size > 1:
            self._reduce_expert_grads([p for n, p in params if is_expert_param(n)])
        return self.global_grad_norm([(n, p) for n, p in params if p.grad is not None])

    def step(self, max_grad_norm: float) -> tuple[float, bool]:
        norm = self.reduce_gradients()
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        grad_norm = float(norm)
        stepped = bool(torch.isfinite(norm))
        scaler = self.layout.accelerator.scaler
        if stepped:
            if max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
            self.optimizer.step()
            self.scheduler.step()
        elif scaler is not None:
            # Every rank skips together (the norm is global); back the fp16 scale off by hand,
            # since a rank whose own shard was finite would otherwise grow it.
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        self.optimizer.zero_grad(set_to_none=True)
        self._steps_since_metrics += 1
        return grad_norm, stepped

    def _reduce_expert_grads(self, params: list[nn.Parameter]) -> None:
        for p in params:
            if p.grad is None:  # no token reached these experts on this rank
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        group = self.layout.mesh.edp_group
        if group is not None:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
        torch._foreach_div_(grads, float(self.world_size))

    # ---- state --------------------------------------------------------------------------------

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.raw_model.state_dict()

    def optimizer_state(self) -> NamedState:
        return optimizer_state_by_name(self.raw_model, self.optimizer)

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        self.raw_model.load_state_dict(state, strict=True)

    def load_optimizer_state(self, named: NamedState) -> None:
        load_optimizer_state_by_name(self.raw_model, self.optimizer, named)


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> NamedState:
    """A torch optimizer's per-parameter state keyed by the parameter's name in `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        names[id(p)]: dict(optimizer.state[p])
        for group in optimizer.param_groups
        for p in group["params"]
        if p in optimizer.state
    }


def load_optimizer_state_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, named: NamedState
) -> None:
    """The inverse: state by name into a torch optimizer, for the parameters it optimizes."""
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        state = named.get(name)
        if state is not None and id(p) in group_of:
            optimizer.state[p] = {k: placed_state(k, v, p, group_of[id(p)]) for k, v in state.items()}


def placed_state(key: str, value: torch.Tensor, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """Where torch's own load_state_dict puts a state tensor: beside its parameter, except AdamW's
    scalar step, which stays a float32 CPU tensor unless the group is fused or capturable; then it
    lives on the parameter's device (the fused CUDA kernel refuses a CPU step: the first GPU resume
    failed with "state_steps is on cpu")."""
    if key == "step":
        device = param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
        return value.to(device=device, dtype=torch.float32)
    return value.to(param.device) if value.dim() else value
