"""DeepSpeed ZeRO-0/1/2 backend (`parallel.backend: deepspeed`): the engine's step, and full
weights and optimizer state gathered out of (and scattered back into) ZeRO's partitions.

Design (the JSON and the accelerator: deepspeed_config.py; the MoE markers: deepspeed_moe.py):
- Experts: DeepSpeed's engine runs our model unchanged. Expert params carry DeepSpeed-MoE's
  markings (`allreduce=False`, `group_name`), a parameter-free `deepspeed.moe.layer.MoE` marker
  on each MoE layer makes the engine build its expert groups (checked equal to our mesh), and the
  optimizer groups are split with `split_params_into_different_moe_groups_for_optimizer`
  (moe_lm/parallel/parallelize.py). DeepSpeed averages expert grads over the full world size,
  the convention the DDP path uses too.
- The trainer's protocol (backward per micro-batch, one step) maps onto DeepSpeed's
  `managed_gradient_accumulation: false`: `backward` accumulates, `step` is the boundary, where
  the engine reduces, clips and steps. The trainer already divides the loss by grad_accum_steps,
  so `scale_wrt_gas=False`.
- Checkpoints: not `engine.save_checkpoint`. Its files are per rank/partition and key experts by
  DeepSpeed's own module layout, so they resume only on the same world size, ZeRO stage and EP
  size. Instead full fp32 weights and optimizer moments are gathered per parameter through
  DeepSpeed's tensor-fragment API (`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`)
  and written in the one checkpoint format (moe_lm/state), and scattered back on load
  (`safe_set_full_*`). One format for every backend, ZeRO stage and EP size; export reads any
  checkpoint.
- ZeRO-0 in fp32 hands our torch optimizer to the engine unwrapped; the engine then clips with
  `deepspeed.runtime.utils.clip_grad_norm_`, which averages each rank's local norm (dense + its
  own experts) instead of taking the global one, and reports no norm at all. There moe_lm clips
  itself, in a step pre-hook on the optimizer, i.e. after the engine's gradient all-reduce, with
  the DDP backend's global norm (and skips a non-finite step like it). ZeRO-1/2 and the bf16/fp16
  wrappers of stage 0 compute the expert-aware global norm themselves.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from moe_lm.libraries import configure_deepspeed
from moe_lm.parallel.backend import (
    Backend,
    Parallelized,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
)
from moe_lm.parallel.layout import Layout
from moe_lm.state.optimizer import NamedState


class DeepSpeedBackend(Backend):
    def __init__(self, layout: Layout, parts: Parallelized) -> None:
        super().__init__(layout, parts)
        self.engine: Any = parts.wrapped
        self.torch_optimizer = parts.torch_optimizer
        # Unwrapped (ZeRO-0, fp32): the engine would clip by the wrong norm; we clip (docstring).
        self._own_clip = self.engine.optimizer is self.torch_optimizer
        self._max_grad_norm = 0.0
        self._own_norm: torch.Tensor | None = None
        if self._own_clip:
            self.torch_optimizer.register_step_pre_hook(self._clip_by_global_norm)

    # ---- the step -----------------------------------------------------------------------------

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # backward only accumulates; step() is the boundary

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # the engine holds the weights in bf16/fp16 itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float) -> tuple[float, bool]:
        """Reduce, clip (by the config's gradient_clipping = optim.grad_clip) and step."""
        self._max_grad_norm = max_grad_norm
        self.engine.step()
        if self._own_clip:
            assert self._own_norm is not None, "the engine did not step the optimizer"
            norm: Any = self._own_norm
            stepped = bool(torch.isfinite(norm))
            self._own_norm = None
        else:
            norm = self.engine.get_global_grad_norm()
            stepped = bool(self.engine.was_step_applied())
        if stepped:
            self.scheduler.step()
        self._steps_since_metrics += 1
        return float("nan") if norm is None else float(norm), stepped

    def _clip_by_global_norm(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Runs inside `engine.step()`, after its all-reduce: gradients are final here."""
        named = [(n, p) for n, p in self.raw_model.named_parameters() if p.grad is not None]
        params = [p for _, p in named]
        norm = self.global_grad_norm(named)
        self._own_norm = norm
        if not bool(torch.isfinite(norm)):
            for p in params:  # AdamW leaves parameters without a gradient alone: a skipped step
                p.grad = None
        elif self._max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self._max_grad_norm, norm)

    # ---- state on disk: gathered through DeepSpeed's tensor-fragment API (collective) ----------

    def _fragmented(self, p: nn.Parameter) -> bool:
        return hasattr(p, "_hp_mapping")

    def _base_optimizer(self) -> torch.optim.Optimizer:
        return self.torch_optimizer

    def _optim_keys(self) -> list[str]:
        state: dict[str, Any] = next(iter(self._base_optimizer().state.values()), {})
        return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.dim())

    def model_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        state = dict(self.raw_model.state_dict())
        for name, p in self.raw_model.named_parameters():
            if self._fragmented(p):
                state[name] = safe_get_full_fp32_param(p).cpu()
        return state

    def optimizer_state(self) -> NamedState:
        from deepspeed.utils import safe_get_full_optimizer_state

        if not any(self._fragmented(p) for p in self.raw_model.parameters()):
            return optimizer_state_by_name(self.raw_model, self.optimizer)  # ZeRO-0 in fp32
        keys = self._optim_keys()
        if not keys:
            return {}  # nothing stepped yet
        self._link_fragments()
        step = next(iter(self._base_optimizer().state.values()))["step"]
        return {
            name: {"step": step.clone(), **{k: safe_get_full_optimizer_state(p, k).cpu() for k in keys}}
            for name, p in self.raw_model.named_parameters()
            if p.requires_grad
        }

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        self.raw_model.load_state_dict(state, strict=True)  # the (maybe bf16) weights the engine runs
        for name, p in self.raw_model.named_parameters():
            if self._fragmented(p):
                safe_set_full_fp32_param(p, state[name].to(p.device, torch.float32))

    def load_optimizer_state(self, named: NamedState) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        if not any(self._fragmented(p) for p in self.raw_model.parameters()):
            load_optimizer_state_by_name(self.raw_model, self.optimizer, named)  # ZeRO-0 in fp32
            return
        per_param = {n: named.get(n) for n, _ in self.raw_model.named_parameters()}
        sample = next((s for s in per_param.values() if s is not None), None)
        if sample is None:
            return
        base = self._base_optimizer()
        flats = [group["params"][0] for group in base.param_groups]
        for flat in flats:  # a fresh engine has no state yet: create it, then link the fragments
            entry = base.state[flat]
            entry["step"] = sample["step"].clone()
            for k, v in sample.items():
                if v.dim() and k not in entry:
                    entry[k] = torch.zeros_like(flat)
        self._link_fragments()
        for name, p in self.raw_model.named_parameters():
            state = per_param[name]
            if not self._fragmented(p) or state is None:
                continue
            for k, v in state.items():
                if v.dim():  # every rank calls: a rank without a fragment of p just skips the copy
                    safe_set_full_optimizer_state(p, v.to(p.device, torch.float32), k)

    def _link_fragments(self) -> None:
        # Point every parameter's fragment at the optimizer state of its flat partition. ZeRO-1/2
        # links them lazily after stepping only the first param group (deepspeed 0.19.8), which
        # leaves the other groups, ours included once experts are split out, unlinked.
        base = self._base_optimizer()
        for p in self.raw_model.parameters():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                flat = base.param_groups[mapping.param_group_index]["params"][0]
                mapping.set_optim_state_fragment(flat, base.state[flat])


def warm_deepspeed_ops() -> None:
    """Build (once, cached in this environment: moe_lm/libraries.py) the shared-memory comm op
    DeepSpeed's CPU accelerator compiles on first start, ~70-100 s; afterwards it loads in a moment."""
    configure_deepspeed()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)
