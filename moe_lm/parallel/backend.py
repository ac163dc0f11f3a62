"""The process-aware half of training: Accelerate (DDP) plumbing behind one small interface.

The trainer only loops; everything that knows about processes, wrapping, precision, gradient
reduction and per-rank state on disk is here. BACKEND-V1: single process and plain DDP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_lm.config import Config
from moe_lm.model import MoETransformer
from moe_lm.train.weights import load_model_state, save_weights


class Backend:
    def __init__(self, cfg: Config) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        precision = cfg.train.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = Accelerator(mixed_precision=precision)
        self.mixed_precision = precision
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.dp_rank, self.dp_size = self.rank, self.world_size  # data is sharded over every rank
        self.ep_rank, self.ep_size = 0, 1
        self.model: nn.Module
        self.raw_model: MoETransformer
        self.optimizer: torch.optim.Optimizer
        self.scheduler: torch.optim.lr_scheduler.LambdaLR

    # ---- set-up -------------------------------------------------------------------------------

    def prepare(
        self,
        model: MoETransformer,
        param_groups: list[dict[str, Any]],
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        lr_lambda: Callable[[int], float],
    ) -> None:
        """Place and wrap the model, build the optimizer over `param_groups` and the LR schedule."""
        self.raw_model = model
        optimizer = make_optimizer(param_groups)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)

    @property
    def expert_range(self) -> tuple[int, int]:
        """Global indices [start, end) of the experts this rank holds."""
        per_rank = self.cfg.model.num_experts // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank

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

    def step(self, max_grad_norm: float) -> tuple[float, bool]:
        """Clip by the global norm and step; a non-finite norm skips the update. -> (norm, stepped)."""
        self.accelerator.unscale_gradients()
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_norm = float(norm)
        stepped = bool(torch.isfinite(norm))
        if stepped:
            if max_grad_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    # ---- collectives for metrics --------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        reduced = self.accelerator.reduce(tensor.to(self.device), reduction=op)
        return reduced

    def extra_metrics(self) -> dict[str, Any]:
        """Backend-specific per-step metrics for the logs (EP: tokens per rank, all-to-all time)."""
        return {}

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    # ---- state on disk ------------------------------------------------------------------------

    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.raw_model.named_parameters()}

    def save_state(self, directory: Path) -> None:
        """This rank's share: weights (EP-rank files, experts by global index) and optimizer state."""
        if self.dp_rank_in_expert_group == 0:
            save_weights(directory, self.raw_model.state_dict(), self.ep_rank, self.ep_size, self.expert_range[0])
            names = self._param_names()
            state = {
                names[id(p)]: {k: v for k, v in self.optimizer.state[p].items()}
                for group in self.optimizer.param_groups
                for p in group["params"]
                if p in self.optimizer.state
            }
            torch.save(
                {"optimizer": state, "scheduler": self.scheduler.state_dict(), "expert_range": self.expert_range},
                Path(directory) / f"optim-ep{self.ep_rank}-of-{self.ep_size}.pt",
            )

    @property
    def dp_rank_in_expert_group(self) -> int:
        """Rank within the group that holds the same experts; 0 writes them."""
        return self.rank // self.ep_size

    def load_state(self, directory: Path, weights_only: bool = False) -> None:
        state = load_model_state(directory, self.expert_range)
        self.raw_model.load_state_dict(state, strict=True)
        if weights_only:
            return
        # Merge every EP rank's optimizer file, then keep the state of the parameters held here.
        named: dict[str, dict[str, torch.Tensor]] = {}
        scheduler_state = None
        for f in sorted(Path(directory).glob("optim-ep*-of-*.pt")):
            blob = torch.load(f, map_location="cpu", weights_only=False)
            named.update(_split_expert_state(blob["optimizer"], blob["expert_range"][0]))
            scheduler_state = blob["scheduler"]
        for name, p in self.raw_model.named_parameters():
            state = _stack_expert_state(named, name, self.expert_range)
            if state is not None:
                self.optimizer.state[p] = {k: v.to(p.device) if v.dim() else v for k, v in state.items()}
        if scheduler_state is not None:
            self.scheduler.load_state_dict(scheduler_state)
            # LambdaLR writes the lr into the param groups only when it steps: restore it now, or the
            # first step after a resume would run at the initial lr.
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr

    def shutdown(self) -> None:
        self.accelerator.end_training()


def _split_expert_state(state: dict[str, dict[str, torch.Tensor]], offset: int) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state of stacked expert params -> one entry per global expert index."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, entry in state.items():
        if name.endswith(("ffn.experts.gate_up_proj", "ffn.experts.down_proj")):
            prefix, leaf = name.rsplit(".", 1)
            n = next(v.shape[0] for v in entry.values() if v.dim())
            for e in range(n):
                out[f"{prefix}.{offset + e}.{leaf}"] = {k: v[e] if v.dim() else v for k, v in entry.items()}
        else:
            out[name] = entry
    return out


def _stack_expert_state(
    named: dict[str, dict[str, torch.Tensor]], name: str, expert_range: tuple[int, int]
) -> dict[str, torch.Tensor] | None:
    if not name.endswith(("ffn.experts.gate_up_proj", "ffn.experts.down_proj")):
        return named.get(name)
    prefix, leaf = name.rsplit(".", 1)
    entries = [named.get(f"{prefix}.{e}.{leaf}") for e in range(*expert_range)]
    if any(e is None for e in entries):
        return None
    first = entries[0]
    assert first is not None
    return {k: torch.stack([e[k] for e in entries if e is not None]) if v.dim() else v for k, v in first.items()}
