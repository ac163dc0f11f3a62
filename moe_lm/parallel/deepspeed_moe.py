"""Make DeepSpeed's engine recognise our MoE layers without letting it run them.

deepspeed 0.19.8 decides `has_moe_layers` by scanning the model for `deepspeed.moe.layer.MoE`
instances. Without one, ZeRO-1/2 crash in `average_tensor` (no expert-data-parallel group) and
ZeRO-3 silently replicates the experts. Its AutoEP instead replaces the MoE module with its own
and rejects a load-balance coefficient (our router losses would be lost). So each of our MoE
layers gets a parameter-free child that *is* a `MoE` to the engine: it carries `num_experts`,
`ep_size`, `expert_group_name` and `set_deepspeed_parallelism()`, which creates DeepSpeed's
expert groups and checks they are the ranks our mesh uses. The forward never goes through it;
the state dict does not change (it has no parameters or buffers).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from moe_lm.errors import UserError
from moe_lm.model import MoETransformer
from moe_lm.parallel.expert_parallel import expert_group_name
from moe_lm.parallel.mesh import Mesh

MARKER_NAME = "deepspeed_moe_marker"


class DeepSpeedMoEMarker(MoE):
    def __init__(self, num_experts: int, mesh: Mesh) -> None:
        nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own gate and experts
        self.num_experts = num_experts
        self.ep_size = mesh.ep_size
        self.num_local_experts = num_experts // mesh.ep_size
        self.expert_group_name = expert_group_name(mesh.ep_size)
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self._ep_ranks = mesh.ep_ranks
        self._edp_ranks = mesh.edp_ranks

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by the engine at start-up. Collective (creates process groups once per name)."""
        if use_data_before_expert_parallel_:
            raise UserError(
                "DeepSpeed 'use_data_before_expert_parallel_' orders expert groups differently from "
                "moe_lm's mesh; remove it from parallel.deepspeed_config"
            )
        name = self.expert_group_name
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size)
        ep = dist.get_process_group_ranks(groups._get_expert_parallel_group(name))
        edp = dist.get_process_group_ranks(groups._get_expert_data_parallel_group(name))
        if list(ep) != self._ep_ranks or list(edp) != self._edp_ranks:
            raise RuntimeError(
                f"DeepSpeed expert groups (ep {ep}, edp {edp}) differ from moe_lm's mesh "
                f"(ep {self._ep_ranks}, edp {self._edp_ranks})"
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("DeepSpeedMoEMarker only marks an MoE layer for DeepSpeed; it is never called")


def mark_moe_layers(model: MoETransformer, mesh: Mesh) -> None:
    """Attach a marker to every MoE layer (only with expert parallelism: ep_size 1 is dense to DeepSpeed)."""
    if mesh.ep_size == 1:
        return
    for layer in model.moe_layers:
        if not hasattr(layer, MARKER_NAME):
            layer.add_module(MARKER_NAME, DeepSpeedMoEMarker(model.cfg.num_experts, mesh))
