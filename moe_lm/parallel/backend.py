"""The process-aware half of training: Accelerate (DDP) plumbing behind one small interface.

The trainer only loops; everything that knows about processes, wrapping, precision, gradient
reduction and per-rank state on disk is here. `Backend(cfg)` returns the DeepSpeed subclass
(moe_lm/parallel/deepspeed_backend.py) when `parallel.backend: deepspeed`.

Expert parallelism under DDP (parallel.ep_size > 1): each rank holds E/ep experts; DDP never sees
them (excluded from its all-reduce and its initial broadcast). At the sync step their gradients
are summed over the expert-data-parallel group and divided by the world size, the same
convention DDP uses for the dense weights (average over every rank) and DeepSpeed uses for
experts, so N processes × accum A equal one process running the N·A micro-batches. The clipping
norm is global: dense gradients (identical everywhere) counted once, expert gradients summed over
the EP group.

Checkpoint layout (both backends): `model-ep{r}-of-{n}.safetensors` with experts under their
global index (moe_lm/state/weights.py) and `optim-ep{r}-of-{n}.pt` with optimizer state by
parameter name, experts split per global index; written by expert-data-parallel rank 0 of each
EP group, read by every rank for what it holds, so any EP size and either backend can resume it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_lm.config import Config
from moe_lm.errors import UserError
from moe_lm.model import MoETransformer
from moe_lm.model.params import is_expert_param
from moe_lm.parallel.expert_parallel import EPStats, apply_expert_parallel
from moe_lm.parallel.mesh import Mesh, build_mesh
from moe_lm.state.optimizer import NamedState, load_optimizer_state, save_optimizer_state
from moe_lm.state.weights import load_model_state, save_weights


def launch_hint(cfg: Config) -> str:
    if cfg.parallel.backend == "deepspeed":
        return "accelerate launch --config_file configs/accelerate/deepspeed-zero2.yaml -m moe_lm.cli train CONFIG"
    return "accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m moe_lm.cli train CONFIG"


class Backend:
    def __new__(cls, cfg: Config) -> Backend:
        if cls is Backend and cfg.parallel.backend == "deepspeed":
            from moe_lm.parallel.deepspeed_backend import DeepSpeedBackend

            return super().__new__(DeepSpeedBackend)
        return super().__new__(cls)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        precision = cfg.train.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "no"
        self.mixed_precision = precision
        self.accelerator = self._make_accelerator(precision)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self._check_launch()
        if self.world_size > 1:
            # Read by moe_lm.cli.run: gloo workers sometimes abort in interpreter teardown even
            # after destroy_process_group; they leave with os._exit once `shutdown` has run.
            os.environ["MOE_LM_HARD_EXIT"] = "1"
        self.dp_rank, self.dp_size = self.rank, self.world_size  # data is sharded over every rank
        self.mesh: Mesh = build_mesh(cfg.parallel.ep_size, cfg.model.num_experts)
        self.ep_rank, self.ep_size = self.mesh.ep_rank, self.mesh.ep_size
        self.ep_stats: EPStats | None = None
        self._steps_since_metrics = 0
        self.model: nn.Module
        self.raw_model: MoETransformer
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LambdaLR

    def _make_accelerator(self, precision: str) -> Any:
        from accelerate import Accelerator

        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            raise UserError(
                "launched with a DeepSpeed accelerate config but parallel.backend is ddp; set "
                "parallel.backend=deepspeed or launch with configs/accelerate/cpu-2proc.yaml / multi-gpu.yaml"
            )
        # Without a GPU the torchrun launcher needs accelerate's CPU mode, or every rank silently
        # believes it is alone (ACCELERATE_USE_CPU=1 does the same from the environment).
        return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())

    def _check_launch(self) -> None:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world_size:
            raise UserError(
                f"{launched} processes were launched but accelerate joined {self.world_size}; "
                f"on CPU launch with: {launch_hint(self.cfg)}"
            )

    # ---- set-up -------------------------------------------------------------------------------

    @property
    def expert_range(self) -> tuple[int, int]:
        """Global indices [start, end) of the experts this rank holds."""
        return self.mesh.expert_range(self.cfg.model.num_experts)

    def parallelize(self, model: MoETransformer) -> None:
        """Shard experts over the EP group and swap in the all-to-all dispatcher. Idempotent, in
        place (the Parameter objects survive), and done by `prepare` if not called before."""
        self.raw_model = model
        self.ep_stats = apply_expert_parallel(model, self.mesh)

    def prepare(
        self,
        model: MoETransformer,
        param_groups: list[dict[str, Any]],
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        lr_lambda: Callable[[int], float],
    ) -> None:
        """Place and wrap the model, build the optimizer over `param_groups` and the LR schedule."""
        self.parallelize(model)
        if self.ep_size > 1 and self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Each rank holds different experts: DDP must neither broadcast nor average them.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, [n for n, _ in model.named_parameters() if is_expert_param(n)]
            )
            self._broadcast_experts(model)
        optimizer = make_optimizer(param_groups)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    @torch.no_grad()
    def _broadcast_experts(self, model: nn.Module) -> None:
        # DDP's initial broadcast makes dense weights agree whatever each rank's seed was; do the
        # same for experts within the group of ranks that hold them.
        if self.mesh.edp_group is None:
            return
        for name, p in model.named_parameters():
            if is_expert_param(name):
                data = p.data.to(self.device)
                dist.broadcast(data, src=self.mesh.edp_ranks[0], group=self.mesh.edp_group)
                p.data.copy_(data)

    # ---- the step -----------------------------------------------------------------------------

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Micro-steps before the last one of an accumulation skip the gradient all-reduce."""
        if sync or self.world_size == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.model)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def reduce_gradients(self) -> torch.Tensor:
        """Finish this step's gradients (unscale, average expert grads over their expert-data-
        parallel group) and return the global norm. Called by `step`; tests call it to read the
        gradients one process would have. Collective under expert parallelism."""
        self.accelerator.unscale_gradients()
        params = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]
        if self.ep_size > 1:
            self._reduce_expert_grads([p for n, p in params if is_expert_param(n)])
        return self._global_grad_norm([(n, p) for n, p in params if p.grad is not None])

    def step(self, max_grad_norm: float) -> tuple[float, bool]:
        """Clip by the global norm and step; a non-finite norm skips the update. -> (norm, stepped)."""
        norm = self.reduce_gradients()
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        grad_norm = float(norm)
        stepped = bool(torch.isfinite(norm))
        if stepped:
            if max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
            self.optimizer.step()
            self.scheduler.step()
        elif self.accelerator.scaler is not None:
            # Every rank skips together (the norm is global); back the fp16 scale off by hand,
            # since a rank whose own shard was finite would otherwise grow it.
            scaler = self.accelerator.scaler
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        self.optimizer.zero_grad(set_to_none=True)
        self._steps_since_metrics += 1
        return grad_norm, stepped

    def _reduce_expert_grads(self, params: list[nn.Parameter]) -> None:
        for p in params:
            if p.grad is None:  # no token reached these experts on this rank
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        if self.mesh.edp_group is not None:
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.mesh.edp_group)
            for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
        torch._foreach_div_(grads, float(self.world_size))

    def _global_grad_norm(self, params: list[tuple[str, nn.Parameter]]) -> torch.Tensor:
        dense = [p.grad for n, p in params if p.grad is not None and not is_expert_param(n)]
        experts = [p.grad for n, p in params if p.grad is not None and is_expert_param(n)]
        sq = torch.zeros(2, dtype=torch.float32, device=self.device)
        if dense:
            sq[0] = torch.nn.utils.get_total_norm(dense).float() ** 2
        if experts:
            sq[1] = torch.nn.utils.get_total_norm(experts).float() ** 2
        if self.ep_size > 1 and self.mesh.ep_group is not None:
            part = sq[1:].clone()
            dist.all_reduce(part, group=self.mesh.ep_group)
            sq[1:] = part
        return sq.sum().sqrt()

    # ---- collectives for metrics --------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        reduced = self.accelerator.reduce(tensor.to(self.device), reduction=op)
        return reduced

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def extra_metrics(self) -> dict[str, Any]:
        """Expert-parallel load since the last call, per optimizer step: rows each rank's experts
        received and seconds spent in the token all-to-alls, as lists indexed by rank. Collective
        (call on every rank, e.g. at each logging step); {} without expert parallelism."""
        if self.ep_size == 1 or self.ep_stats is None:
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

    # ---- state on disk ------------------------------------------------------------------------

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        return self.raw_model.state_dict()

    def _optimizer_state_by_name(self) -> NamedState:
        names = {id(p): n for n, p in self.raw_model.named_parameters()}
        return {
            names[id(p)]: dict(self.optimizer.state[p])
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p in self.optimizer.state
        }

    def _load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.raw_model.load_state_dict(state, strict=True)

    def _load_optimizer_state(self, named: NamedState) -> None:
        optimized = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        for name, p in self.raw_model.named_parameters():
            state = named.get(name)
            if state is not None and id(p) in optimized:
                self.optimizer.state[p] = {k: v.to(p.device) if v.dim() else v for k, v in state.items()}

    def save_state(self, directory: Path) -> None:
        """This EP rank's share: weights (experts by global index) and optimizer state. Collective:
        call on every rank; expert-data-parallel rank 0 of each EP group writes."""
        weights = self._weights_to_save()
        named = self._optimizer_state_by_name()
        if self.mesh.edp_rank != 0:
            return
        save_weights(directory, weights, self.ep_rank, self.ep_size, self.expert_range[0])
        save_optimizer_state(
            directory, named, self.scheduler.last_epoch, self.expert_range, self.ep_rank, self.ep_size
        )

    def load_state(self, directory: Path, weights_only: bool = False) -> None:
        """Load what this rank holds from a checkpoint written at any EP size, by either backend."""
        self._load_weights(load_model_state(directory, self.expert_range))
        if weights_only:
            return
        named, last_epoch = load_optimizer_state(directory, self.expert_range)
        self._load_optimizer_state(named)
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

    def shutdown(self) -> None:
        """End training and the process group (the deterministic gloo teardown: barrier first)."""
        self.accelerator.end_training()
        if sys.exc_info()[0] is not None:
            return  # a failing rank must not wait in a barrier for peers stuck in a collective
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
