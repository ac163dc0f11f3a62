"""DeepSpeed's side of process start-up: its JSON, generated from the run YAML, and the accelerator.

The run YAML is the single source of truth. The DeepSpeed JSON is generated from it (micro batch,
grad accumulation, clipping, bf16/fp16, ZeRO stage) or read from `parallel.deepspeed_config`,
where keys that contradict the YAML are refused. The accelerate config file only chooses the
launcher; its zero_stage must agree with the YAML. ZeRO-3 is refused: it partitions every weight
over all ranks, which defeats expert parallelism and the whole-parameter checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from moe_lm.config import Config
from moe_lm.errors import UserError
from moe_lm.libraries import configure_deepspeed, drop_build_notice
from moe_lm.parallel.waits import init_kwargs


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
        ds["gradient_clipping"] = 0.0  # DeepSpeedBackend clips by the global norm (deepspeed_backend.py)
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


def check_accelerate_fields(cfg: Config) -> None:
    # `accelerate launch` exports the accelerate YAML's deepspeed_config fields, and accelerate
    # refuses them next to a full DeepSpeed JSON (ours). Check them against the run config here,
    # then tell accelerate they are consumed.
    stage = cfg.parallel.zero_stage
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
            raise UserError(f"remove {name} from the accelerate config; moe_lm takes it from {where[name]}")
    os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = ""


def deepspeed_accelerator(cfg: Config, precision: str, timeout_s: float | None = None) -> Any:
    """An accelerate `Accelerator` whose `prepare` builds a DeepSpeed engine with our JSON."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    check_accelerate_fields(cfg)
    configure_deepspeed()
    # accelerate's CPU mode silently turns DeepSpeed off; DeepSpeed picks CPU and gloo itself.
    os.environ.pop("ACCELERATE_USE_CPU", None)
    # DeepSpeed's init_distributed gets the backend (gloo on CPU) and the timeout
    handlers = [init_kwargs(timeout_s, "nccl" if torch.cuda.is_available() else "gloo")]
    with drop_build_notice():  # DeepSpeed's process-group start loads its comm op and says so
        return Accelerator(
            mixed_precision=precision,
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, precision)),
            kwargs_handlers=handlers,
        )
