"""In-process checks of the parallel plumbing: group layout, regrouping, DeepSpeed config, launch guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_lm.config import Config, ParallelConfig
from moe_lm.errors import UserError
from moe_lm.model import MoETransformer
from moe_lm.parallel.expert_parallel import source_to_expert_order
from moe_lm.parallel.layout import check_launch, ddp_accelerator
from moe_lm.parallel.mesh import Mesh, expert_data_parallel_ranks, expert_parallel_ranks, validate_ep
from tests.conftest import tiny_model_config

REPO = Path(__file__).resolve().parents[2]


def test_groups_are_consecutive_ep_blocks_and_strided_edp() -> None:
    assert expert_parallel_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_data_parallel_ranks(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert expert_parallel_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expert_data_parallel_ranks(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    mesh = Mesh(rank=5, world_size=8, ep_size=4, ep_group=None, edp_group=None)
    assert (mesh.ep_rank, mesh.edp_rank, mesh.ep_ranks, mesh.edp_ranks) == (1, 1, [4, 5, 6, 7], [1, 5])
    assert mesh.expert_range(8) == (2, 4)


@pytest.mark.parametrize(
    ("ep", "world", "experts", "says"),
    [(3, 4, 6, "does not divide the 4 launched processes"), (2, 2, 3, "not divisible by parallel.ep_size")],
)
def test_bad_ep_size_is_one_line(ep: int, world: int, experts: int, says: str) -> None:
    with pytest.raises(UserError, match=says) as info:
        validate_ep(ep, world, experts)
    assert "\n" not in str(info.value)


def test_received_rows_regroup_from_source_order_to_expert_order() -> None:
    # source 0 sends 1 row to local expert 0 and 2 to expert 1; source 1 sends 3 rows to expert 0
    counts_RE = torch.tensor([[1, 2], [3, 0]])
    assert source_to_expert_order(counts_RE, 6).tolist() == [0, 3, 4, 5, 1, 2]
    assert source_to_expert_order(torch.zeros(2, 2, dtype=torch.long), 0).numel() == 0


def _cfg(**parallel: object) -> Config:
    return Config(model=tiny_model_config(), parallel=ParallelConfig(**parallel))  # type: ignore[arg-type]


def test_deepspeed_config_is_generated_from_the_run_config() -> None:
    from moe_lm.parallel.deepspeed_config import deepspeed_config

    ds = deepspeed_config(_cfg(backend="deepspeed", zero_stage=2, ep_size=2), "bf16")
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["managed_gradient_accumulation"] is False
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 1.0


def test_deepspeed_refuses_zero3_with_ep_and_contradicting_json(tmp_path: Path) -> None:
    from moe_lm.parallel.deepspeed_config import deepspeed_config

    with pytest.raises(UserError, match="ZeRO stage 3 with parallel.ep_size > 1"):
        deepspeed_config(_cfg(backend="deepspeed", zero_stage=3, ep_size=2), "no")
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}}))
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu = 2 contradicts"):
        deepspeed_config(_cfg(backend="deepspeed", zero_stage=1, deepspeed_config=str(user)), "no")
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 1}}))
    with pytest.raises(UserError, match="remove 'optimizer'"):
        deepspeed_config(_cfg(backend="deepspeed", zero_stage=1, deepspeed_config=str(user)), "no")
    user.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}))
    ds = deepspeed_config(_cfg(backend="deepspeed", zero_stage=1, deepspeed_config=str(user)), "no")
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # the user's own keys are kept


def test_a_launch_that_came_up_single_process_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="configs/accelerate/cpu-2proc.yaml") as info:
        check_launch(_cfg(), 1)
    assert "\n" not in str(info.value)


def test_ddp_backend_refuses_a_deepspeed_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserError, match="parallel.backend=deepspeed"):
        ddp_accelerator(_cfg(), "no")


def test_deepspeed_backend_refuses_another_zero_stage_from_the_accelerate_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moe_lm.parallel.deepspeed_config import check_accelerate_fields

    cfg = _cfg(backend="deepspeed", zero_stage=1)
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "zero_stage,offload_param_device")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(UserError, match="use configs/accelerate/deepspeed-zero1.yaml"):
        check_accelerate_fields(cfg)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    check_accelerate_fields(cfg)  # consumed: accelerate must not see them next to our JSON
    assert __import__("os").environ["ACCELERATE_CONFIG_DS_FIELDS"] == ""


def test_deepspeed_marker_is_an_moe_to_the_engine_and_changes_no_weights() -> None:
    from deepspeed.moe.layer import MoE

    from moe_lm.parallel.deepspeed_moe import mark_moe_layers

    model = MoETransformer(tiny_model_config())
    before = {name: t.clone() for name, t in model.state_dict().items()}
    mark_moe_layers(model, Mesh(rank=0, world_size=2, ep_size=2, ep_group=None, edp_group=None))
    markers = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(markers) == len(model.moe_layers) and markers[0].num_experts == 8 and markers[0].ep_size == 2
    after = model.state_dict()
    assert list(after) == list(before)
    assert [name for name, t in after.items() if not torch.equal(t, before[name])] == []
    # torch.equal compares values across dtypes (a lossless float64 upcast is "equal"): dtypes and
    # trainability are compared on their own
    assert {n: t.dtype for n, t in after.items()} == {n: t.dtype for n, t in before.items()}
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["cpu-2proc", "multi-gpu", "deepspeed-zero1", "deepspeed-zero2"])
def test_shipped_accelerate_configs(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    if name.startswith("deepspeed"):
        assert cfg.distributed_type == "DEEPSPEED" and cfg.deepspeed_config["zero_stage"] == int(name[-1])
        assert cfg.mixed_precision is None  # accelerate refuses it next to a DeepSpeed JSON
    else:
        assert cfg.distributed_type == "MULTI_GPU"  # the torchrun launcher, also for CPU processes
    assert cfg.num_processes == (8 if name == "multi-gpu" else 2)


def test_parallel_timeout_is_every_process_groups_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate drops an init kwarg equal to its own default (600 s), and torch gives the expert
    groups (and DeepSpeed's) its own defaults: gloo's 30 minutes, whatever parallel.timeout said."""
    from datetime import timedelta

    import torch.distributed as dist

    from moe_lm.parallel.waits import init_kwargs, resolve_timeout, set_group_timeout

    c10d = dist.distributed_c10d
    monkeypatch.setattr(c10d, "default_pg_timeout", c10d.default_pg_timeout)
    monkeypatch.setattr(c10d, "default_pg_nccl_timeout", c10d.default_pg_nccl_timeout)
    set_group_timeout(600.0)
    assert c10d._get_default_timeout("gloo") == timedelta(seconds=600)  # what init and new_group fall back to
    assert init_kwargs(45.0, "gloo").to_kwargs() == {"backend": "gloo", "timeout": timedelta(seconds=45)}
    assert (resolve_timeout(None, "cpu"), resolve_timeout(None, "cuda"), resolve_timeout(7, "cpu")) == (
        1800,
        600,
        7,
    )
