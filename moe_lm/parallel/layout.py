"""Where this process stands: launch checks, the accelerate `Accelerator`, ranks and expert groups.

`start_processes(cfg)` is the first thing a training run does (before any data or model): it joins
the process group the launcher set up (through accelerate: DDP, or DeepSpeed with the JSON built
from the run YAML), refuses a launch that came up wrong, and builds the expert-parallel mesh
(moe_lm/parallel/mesh.py). The resulting `Layout` answers "who am I" and runs the collectives
that metrics, data preparation and checkpoints need; it knows nothing of the model.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_lm.config import Config
from moe_lm.errors import UserError
from moe_lm.libraries import configure_deepspeed
from moe_lm.parallel.deepspeed_config import deepspeed_accelerator
from moe_lm.parallel.mesh import Mesh, build_mesh, ep_groups_cross_nodes


def resolve_precision(setting: str, device_type: str) -> str:
    """train.mixed_precision with "auto" resolved: bf16 on GPU, fp32 ("no") on CPU."""
    if setting != "auto":
        return setting
    return "bf16" if device_type == "cuda" else "no"


def launch_hint(cfg: Config) -> str:
    if cfg.parallel.backend == "deepspeed":
        return "moe-lm launch --config_file configs/accelerate/deepspeed-zero2.yaml train CONFIG"
    return "moe-lm launch --config_file configs/accelerate/cpu-2proc.yaml train CONFIG"


def check_launch(cfg: Config, joined: int) -> None:
    """The launcher's WORLD_SIZE must be what accelerate joined (else every rank trains alone)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != joined:
        raise UserError(
            f"{launched} processes were launched but accelerate joined {joined}; "
            f"on CPU launch with: {launch_hint(cfg)}"
        )


def ddp_accelerator(cfg: Config, precision: str) -> Any:
    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise UserError(
            "launched with a DeepSpeed accelerate config but parallel.backend is ddp; set "
            "parallel.backend=deepspeed or launch with configs/accelerate/cpu-2proc.yaml / multi-gpu.yaml"
        )
    # Without a GPU the torchrun launcher needs accelerate's CPU mode, or every rank silently
    # believes it is alone (ACCELERATE_USE_CPU=1 does the same from the environment).
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


@dataclass(frozen=True)
class Layout:
    """This process's rank, device and groups. Data is sharded over every rank (dp = the world);
    experts over the EP groups of `mesh`."""

    accelerator: Any  # accelerate's, set up for DDP or for DeepSpeed
    mesh: Mesh

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.mesh.rank

    @property
    def world_size(self) -> int:
        return self.mesh.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """Global indices [start, end) of the experts this rank holds."""
        return self.mesh.expert_range(num_experts)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction=op)

    def shutdown(self) -> None:
        """End training and the process group (the deterministic gloo teardown: barrier first)."""
        self.accelerator.end_training()
        if sys.exc_info()[0] is not None:
            return  # a failing rank must not wait in a barrier for peers stuck in a collective
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def start_processes(cfg: Config) -> Layout:
    """Join the launched processes and build the expert-parallel groups. Collective."""
    configure_deepspeed()  # before accelerate imports it (its op cache, its CPU notice)
    precision = resolve_precision(cfg.train.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    if cfg.parallel.backend == "deepspeed":
        accelerator = deepspeed_accelerator(cfg, precision)
    else:
        accelerator = ddp_accelerator(cfg, precision)
    check_launch(cfg, accelerator.num_processes)
    mesh = build_mesh(cfg.parallel.ep_size, cfg.model.num_experts)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", mesh.world_size))
    if mesh.rank == 0 and ep_groups_cross_nodes(mesh.world_size, mesh.ep_size, per_node):
        print(
            f"warning: parallel.ep_size = {mesh.ep_size} with {per_node} processes per node puts expert-parallel "
            "groups across nodes: their all-to-all goes over the network; an ep_size that divides the "
            "processes per node keeps it inside one",
            file=sys.stderr,
            flush=True,
        )
    return Layout(accelerator=accelerator, mesh=mesh)
