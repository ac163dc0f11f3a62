"""DeepSpeed ZeRO-0/1/2 backend (`parallel.backend: deepspeed`), launched by `accelerate launch`.

Design:
- The run YAML is the single source of truth. The DeepSpeed JSON is generated from it (micro
  batch, grad accumulation, clipping, bf16/fp16, ZeRO stage) or read from
  `parallel.deepspeed_config`, where keys that contradict the YAML are refused. The accelerate
  config file only chooses the launcher; its zero_stage must agree with the YAML.
- Experts: DeepSpeed's engine runs our model unchanged. Expert params carry DeepSpeed-MoE's
  markings (`allreduce=False`, `group_name`), a parameter-free `deepspeed.moe.layer.MoE` marker
  on each MoE layer makes the engine build its expert groups (checked equal to our mesh), and the
  optimizer groups are split with `split_params_into_different_moe_groups_for_optimizer`.
  DeepSpeed averages expert grads over the full world size, the convention the DDP path uses too.
- The trainer's protocol (backward per micro-batch, one step) maps onto DeepSpeed's
  `managed_gradient_accumulation: false`: `backward` accumulates, `step` is the boundary. The
  trainer already divides the loss by grad_accum_steps, so `scale_wrt_gas=False`.
- Checkpoints: not `engine.save_checkpoint`. Its files are per rank/partition and key experts by
  DeepSpeed's own module layout, so they resume only on the same world size, ZeRO stage and EP
  size. Instead full fp32 weights and optimizer moments are gathered per parameter through
  DeepSpeed's tensor-fragment API (`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`)
  and written in the DDP backend's format (safetensors, experts by global index), and scattered
  back on load (`safe_set_full_*`). One format for every backend, ZeRO stage and EP size;
  export reads any checkpoint.
- ZeRO-3 is refused (config validation and here): it partitions every weight over all ranks, which
  defeats expert parallelism and the whole-parameter checkpoints above.
- ZeRO-0 in fp32 hands our torch optimizer to the engine unwrapped; the engine then clips with
  `deepspeed.runtime.utils.clip_grad_norm_`, which averages each rank's local norm (dense + its
  own experts) instead of taking the global one, and reports no norm at all. There moe_lm clips
  itself, in a step pre-hook on the optimizer, i.e. after the engine's gradient all-reduce, with
  the DDP backend's global norm (and skips a non-finite step like it). ZeRO-1/2 and the bf16/fp16
  wrappers of stage 0 compute the expert-aware global norm themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_lm.config import Config
from moe_lm.errors import UserError
from moe_lm.model import MoETransformer
from moe_lm.parallel.backend import Backend, NamedState
from moe_lm.parallel.deepspeed_moe import mark_moe_layers


def deepspeed_config(cfg: Config, precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON for this run (generated, or the user's checked against the YAML)."""
    t, p = cfg.train, cfg.parallel
    # Keys generated from the run YAML: a user JSON may repeat them but not contradict them.
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    ds: dict[str, Any] = {}
    if p.deepspeed_config:
        try:
            ds = json.loads(Path(p.deepspeed_config).read_text())
        except (OSError, ValueError) as e:
            raise UserError(
                f"parallel.deepspeed_config '{p.deepspeed_config}' is not a readable JSON file: {e}"
            ) from None
        for key, value in ours.items():
            if ds.get(key, "auto") not in ("auto", value):
                raise UserError(
                    f"{p.deepspeed_config}: {key} = {ds[key]} contradicts the run config ({value}); remove it"
                )
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise UserError(
                    f"{p.deepspeed_config}: remove '{key}'; moe_lm builds it from the optim section"
                )
    ds.update(ours)
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.setdefault("stage", p.zero_stage)
    if stage != p.zero_stage:
        raise UserError(
            f"{p.deepspeed_config}: zero_optimization.stage = {stage} contradicts parallel.zero_stage = {p.zero_stage}"
        )
    if stage == 3 and p.ep_size > 1:
        raise UserError(
            "ZeRO stage 3 with parallel.ep_size > 1 is not supported: ZeRO-3 partitions and replicates expert "
            "weights across all ranks, defeating expert parallelism; use zero_stage 1 or 2"
        )
    if stage == 3:
        raise UserError(
            "parallel.zero_stage = 3 is not supported by moe_lm's DeepSpeed backend (its checkpoints and "
            "expert sharding assume whole parameters on each rank); use zero_stage 1 or 2"
        )
    # Overlapping reduction with backward needs stage 2 under caller-managed accumulation; it only
    # pays on GPUs.
    zero.setdefault("overlap_comm", stage == 2 and torch.cuda.is_available())
    if stage == 0 and precision == "no":
        ds["gradient_clipping"] = 0.0  # DeepSpeedBackend clips by the global norm (module docstring)
    ds["train_batch_size"] = "auto"  # accelerate fills micro × accum × world
    ds["managed_gradient_accumulation"] = False
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled") is True and precision != name:
            raise UserError(
                f"{p.deepspeed_config}: {name} is enabled but train.mixed_precision resolves to '{precision}'"
            )
        ds[name] = {**ds.get(name, {}), "enabled": precision == name}
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def warm_deepspeed_ops() -> None:
    """Build (once, cached under ~/.cache/torch_extensions) the shared-memory comm op DeepSpeed's
    CPU accelerator compiles on first start, ~70-100 s; afterwards it loads in a moment."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)


class DeepSpeedBackend(Backend):
    def _make_accelerator(self, precision: str) -> Any:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        self._check_accelerate_fields()
        # accelerate's CPU mode silently turns DeepSpeed off; DeepSpeed picks CPU and gloo itself.
        os.environ.pop("ACCELERATE_USE_CPU", None)
        self.ds_config = deepspeed_config(self.cfg, precision)
        handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
        return Accelerator(
            mixed_precision=precision,
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=self.ds_config),
            kwargs_handlers=handlers,
        )

    def _check_accelerate_fields(self) -> None:
        # `accelerate launch` exports the accelerate YAML's deepspeed_config fields, and accelerate
        # refuses them next to a full DeepSpeed JSON (ours). Check them against the run config here,
        # then tell accelerate they are consumed.
        stage = self.cfg.parallel.zero_stage
        for name in filter(None, os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")):
            env = "ACCELERATE_DEEPSPEED_" + name.upper()
            if name == "zero_stage" and int(os.environ.get(env, stage)) != stage:
                raise UserError(
                    f"the accelerate config launches ZeRO stage {os.environ[env]} but parallel.zero_stage = "
                    f"{stage}; use configs/accelerate/deepspeed-zero{stage}.yaml"
                )
            if name.startswith("offload_") and os.environ.get(env, "none") != "none":
                raise UserError(
                    f"accelerate config sets {name}; put offloading in parallel.deepspeed_config instead"
                )
            if name in (
                "gradient_accumulation_steps",
                "gradient_clipping",
                "mixed_precision",
                "deepspeed_config_file",
            ):
                where = {
                    "gradient_accumulation_steps": "train.grad_accum_steps",
                    "gradient_clipping": "optim.grad_clip",
                    "mixed_precision": "train.mixed_precision",
                    "deepspeed_config_file": "parallel.deepspeed_config",
                }
                raise UserError(
                    f"remove {name} from the accelerate config; moe_lm takes it from {where[name]}"
                )
        os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = ""

    def parallelize(self, model: MoETransformer) -> None:
        super().parallelize(model)
        mark_moe_layers(model, self.mesh)

    def prepare(
        self,
        model: MoETransformer,
        param_groups: list[dict[str, Any]],
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        lr_lambda: Callable[[int], float],
    ) -> None:
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        self.parallelize(model)
        # DeepSpeed keys MoE optimizer groups by group name; then drops groups emptied by the split.
        named = [{"name": g.get("name", f"group{i}"), **g} for i, g in enumerate(param_groups)]
        groups = [g for g in split_params_into_different_moe_groups_for_optimizer(named) if g["params"]]
        self.torch_optimizer = make_optimizer(groups)
        self.model, self.optimizer = self.accelerator.prepare(model, self.torch_optimizer)
        self.engine: Any = self.model
        # On the torch optimizer: ZeRO keeps its param-group dicts, so the lr set here is used.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.torch_optimizer, lr_lambda)
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

    def reduce_gradients(self) -> torch.Tensor:
        raise NotImplementedError("under DeepSpeed gradients are reduced inside step()")

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
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        norm = self._global_grad_norm(params)
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

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        state = dict(self.raw_model.state_dict())
        for name, p in self.raw_model.named_parameters():
            if self._fragmented(p):
                state[name] = safe_get_full_fp32_param(p).cpu()
        return state

    def _optimizer_state_by_name(self) -> NamedState:
        from deepspeed.utils import safe_get_full_optimizer_state

        if not any(self._fragmented(p) for p in self.raw_model.parameters()):
            return super()._optimizer_state_by_name()  # ZeRO-0 in fp32: the plain torch optimizer
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

    def _load_weights(self, state: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        self.raw_model.load_state_dict(state, strict=True)  # the (maybe bf16) weights the engine runs
        for name, p in self.raw_model.named_parameters():
            if self._fragmented(p):
                safe_set_full_fp32_param(p, state[name].to(p.device, torch.float32))

    def _load_optimizer_state(self, named: NamedState) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        from moe_lm.parallel.backend import _stack_expert_state

        if not any(self._fragmented(p) for p in self.raw_model.parameters()):
            super()._load_optimizer_state(named)
            return
        per_param = {
            n: _stack_expert_state(named, n, self.expert_range) for n, _ in self.raw_model.named_parameters()
        }
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
