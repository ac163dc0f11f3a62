"""The two-node accelerate configs (2 x 8 GPUs, DDP+EP and ZeRO-2+EP): accelerate reads them into the
torchrun layout we document, and expert-parallel groups map onto nodes as docs/launching.md says.

No GPU or second machine is needed: accelerate's own argument handling (`_validate_launch_command`,
`prepare_*_env`) computes what torchrun gets; global ranks then follow torchrun's static rendezvous
(group rank = --node_rank, global rank = node_rank x processes per node + local rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moe_lm.parallel.mesh import (
    Mesh,
    ep_groups_cross_nodes,
    expert_data_parallel_ranks,
    expert_parallel_ranks,
)

ACCELERATE = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
CONFIGS = {"ddp": "multi-node-2x8.yaml", "zero2": "multi-node-2x8-zero2.yaml"}


def torchrun_args(
    config: str, machine_rank: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, dict[str, str]]:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.setattr("accelerate.utils.launch.is_port_in_use", lambda port: False)
    argv = ["--config_file", str(ACCELERATE / config), "--machine_rank", str(machine_rank)]
    argv += [
        "--main_process_ip",
        "10.0.0.1",
        "--main_process_port",
        "29500",
        "-m",
        "moe_lm",
        "train",
        "x.yaml",
    ]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        cmd, env = prepare_deepspeed_cmd_env(args)
        assert cmd is None  # the "standard" multi-node launcher: torchrun on each node, no pdsh/ssh
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("machine_rank", [0, 1])
def test_two_node_config_gives_8_processes_per_node(kind: str, machine_rank: int, monkeypatch) -> None:
    args, env = torchrun_args(CONFIGS[kind], machine_rank, monkeypatch)
    assert (args.num_processes, int(args.nnodes), int(args.nproc_per_node)) == (16, 2, 8)
    assert args.node_rank == machine_rank and args.rdzv_backend == "static"
    assert args.rdzv_endpoint == "10.0.0.1:29500"  # every node meets at the first one
    assert args.use_deepspeed == (kind == "zero2")
    if kind == "zero2":
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"


def test_zero2_config_fields_are_accepted_by_a_zero2_run_and_refused_by_another(monkeypatch) -> None:
    from moe_lm.config import config_from_dict
    from moe_lm.errors import UserError
    from moe_lm.parallel.deepspeed_config import check_accelerate_fields

    _, env = torchrun_args(CONFIGS["zero2"], 0, monkeypatch)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    check_accelerate_fields(
        config_from_dict({"parallel": {"backend": "deepspeed", "zero_stage": 2, "ep_size": 8}})
    )
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="launches ZeRO stage 2 but parallel.zero_stage = 1"):
        check_accelerate_fields(config_from_dict({"parallel": {"backend": "deepspeed", "zero_stage": 1}}))


@pytest.mark.parametrize("ep_size", [2, 4, 8])
def test_ep_groups_stay_inside_a_node_and_experts_replicate_across_nodes(ep_size: int) -> None:
    world, per_node = 16, 8
    node = {node_rank * per_node + local: node_rank for node_rank in range(2) for local in range(per_node)}
    for group in expert_parallel_ranks(world, ep_size):
        assert len({node[r] for r in group}) == 1  # the all-to-all never leaves the node
    for group in expert_data_parallel_ranks(world, ep_size):
        assert {node[r] for r in group} == {0, 1}  # each expert's gradient is averaged over both nodes
    assert not ep_groups_cross_nodes(world, ep_size, per_node)
    # rank 9 = node 1, local rank 1
    mesh = Mesh(rank=9, world_size=world, ep_size=ep_size, ep_group=None, edp_group=None)
    per_rank = 8 // ep_size
    assert mesh.expert_range(8) == (9 % ep_size * per_rank, (9 % ep_size + 1) * per_rank)
    assert all(node[r] == 1 for r in mesh.ep_ranks)


def test_an_ep_size_above_the_processes_per_node_is_flagged() -> None:
    assert ep_groups_cross_nodes(16, 16, 8)
    assert ep_groups_cross_nodes(12, 4, 6)  # 6 GPUs per node, EP=4: the second group straddles
    assert not ep_groups_cross_nodes(16, 8, 8)
