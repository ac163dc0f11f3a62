"""Where this process stands: launch checks, the accelerate `Accelerator`, ranks and expert groups.

`start_processes(cfg)` is the first thing a training run does (before any data or model): it joins
the process group the launcher set up (through accelerate: DDP, or DeepSpeed with the JSON built
from the run YAML), refuses a launch that came up wrong, and builds the expert-parallel mesh
(moe_lm/parallel/mesh.py). The resulting `Layout` answers "who am I" and runs the collectives
that metrics, data preparation and checkpoints need; it knows nothing of the model.

Every wait on another process is bounded by `parallel.timeout` (moe_lm/parallel/waits.py): the
process groups are created with it, and barriers go through `Waits`, whose errors say which
process was waited on and what it was doing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from moe_lm.config import Config
from moe_lm.errors import UserError, WaitTimeout
from moe_lm.libraries import configure_deepspeed
from moe_lm.parallel.deepspeed_config import deepspeed_accelerator
from moe_lm.parallel.mesh import Mesh, build_mesh, ep_groups_cross_nodes
from moe_lm.parallel.teardown import bounded_teardown
from moe_lm.parallel.waits import Waits, init_kwargs, resolve_timeout, set_group_timeout


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


def ddp_accelerator(cfg: Config, precision: str, timeout_s: float | None = None) -> Any:
    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise UserError(
            "launched with a DeepSpeed accelerate config but parallel.backend is ddp; set "
            "parallel.backend=deepspeed or launch with configs/accelerate/cpu-2proc.yaml / multi-gpu.yaml"
        )
    # Without a GPU the torchrun launcher needs accelerate's CPU mode, or every rank silently
    # believes it is alone (ACCELERATE_USE_CPU=1 does the same from the environment).
    # only the timeout: accelerate picks the backend (gloo on CPU, NCCL on GPUs)
    handlers = [init_kwargs(timeout_s)]
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)


@dataclass(frozen=True)
class Layout:
    """This process's rank, device and groups. Data is sharded over every rank (dp = the world);
    experts over the EP groups of `mesh`."""

    accelerator: Any  # accelerate's, set up for DDP or for DeepSpeed
    mesh: Mesh
    waits: Waits = field(default_factory=lambda: Waits(0, 1, 0.0))  # one process never waits

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

    def barrier(self, what: str | None = None) -> None:
        """Every process arrives, within parallel.timeout. `what` names it in errors (default: the
        current phase)."""
        self.waits.barrier(what or self.waits.where)

    def doing(self, where: str) -> None:
        """What this process does now (a training step, a phase): named in the errors of the others."""
        self.waits.doing(where)

    @contextlib.contextmanager
    def phase(self, where: str) -> Iterator[None]:
        with self.waits.phase(where):
            yield

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.device), reduction=op)

    def _end_training(self) -> None:
        """accelerate's end of training (destroys the process groups), on the teardown's own thread,
        whose current CUDA device would otherwise be device 0."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.accelerator.end_training()

    def shutdown(self) -> None:
        """End training and the process group (the deterministic gloo teardown: barrier first)."""
        failing = sys.exc_info()[1]  # a failing rank must not wait for peers, but tell them
        if failing is not None:
            self.waits.announce_failure(failing)
        elif dist.is_available() and dist.is_initialized():
            self.doing("finishing the run")
            dist.barrier()  # bounded by the process group's timeout (parallel.timeout)
        self.waits.close()
        if dist.is_available() and dist.is_initialized():  # destroys the process groups, bounded
            bounded_teardown(self._end_training, self.rank)
        else:
            self.accelerator.end_training()


def start_processes(cfg: Config) -> Layout:
    """Join the launched processes and build the expert-parallel groups. Collective."""
    configure_deepspeed()  # before accelerate imports it (its op cache, its CPU notice)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.train.mixed_precision, device_type)
    timeout_s = resolve_timeout(cfg.parallel.timeout, device_type)
    set_group_timeout(timeout_s)  # every process group, ours, accelerate's and DeepSpeed's
    try:
        if cfg.parallel.backend == "deepspeed":
            accelerator = deepspeed_accelerator(cfg, precision, timeout_s)
        else:
            accelerator = ddp_accelerator(cfg, precision, timeout_s)
    except RuntimeError as e:  # torch's DistStoreError / DistNetworkError: not everyone joined in time
        if "timed out" not in str(e).lower():
            raise
        raise WaitTimeout(
            f"process {os.environ.get('RANK', '0')} waited {timeout_s:g} s (parallel.timeout) for the other "
            f"{int(os.environ.get('WORLD_SIZE', '1')) - 1} process(es) to join ({str(e).strip().splitlines()[0]}); "
            "check that every process was started, with the same MASTER_ADDR and MASTER_PORT"
        ) from None
    check_launch(cfg, accelerator.num_processes)
    mesh = build_mesh(cfg.parallel.ep_size, cfg.model.num_experts)
    waits = Waits.join(timeout_s)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", mesh.world_size))
    if mesh.rank == 0 and ep_groups_cross_nodes(mesh.world_size, mesh.ep_size, per_node):
        print(
            f"warning: parallel.ep_size = {mesh.ep_size} with {per_node} processes per node puts expert-parallel "
            "groups across nodes: their all-to-all goes over the network; an ep_size that divides the "
            "processes per node keeps it inside one",
            file=sys.stderr,
            flush=True,
        )
    return Layout(accelerator=accelerator, mesh=mesh, waits=waits)
