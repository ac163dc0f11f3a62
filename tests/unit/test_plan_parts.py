"""The pieces of `moe-lm plan` that need no rehearsal: routing assumption, GPU kinds, layouts, FLOP
formulas, the roofline's arithmetic."""

from __future__ import annotations

import pytest
import torch

from moe_lm.config import load_config
from moe_lm.errors import UserError
from moe_lm.plan.fake import _grouped_mm_flops, _sdpa_flops
from moe_lm.plan.gpus import GIB, KNOWN, parse_gpu
from moe_lm.plan.layouts import JobLayout, auto_layouts, check_layout, parse_layout
from moe_lm.plan.planner import Job
from moe_lm.plan.rehearsal import depths
from moe_lm.plan.routing import AssumedRouting, split_rows
from tests.integration.conftest import REPO

MIXTRAL = REPO / "configs" / "mixtral-8x7b.yaml"


def test_split_rows_is_exact_and_sums_to_rows() -> None:
    assert split_rows(10, [1, 1, 1]) == [4, 3, 3]  # remainder to the lowest index
    assert split_rows(12, [0.5, 0.25, 0.25]) == [6, 3, 3]
    assert split_rows(0, [1, 1]) == [0, 0]
    assert sum(split_rows(1001, [0.3, 0.3, 0.4])) == 1001


def test_imbalance_puts_f_times_the_mean_on_expert_0_and_its_rank() -> None:
    routing = AssumedRouting(8, 2.0)
    assert routing.loads == [0.25] + [0.75 / 7] * 7
    assert routing.rank_loads(2) == pytest.approx([0.25 + 3 * 0.75 / 7, 4 * 0.75 / 7])
    rank0 = routing.reader(ep_size=2, ep_rank=0)
    counts = torch.zeros(2, dtype=torch.long)
    out = rank0(counts, 800, "ranks_out")
    assert out == split_rows(800, routing.rank_loads(2)) and sum(out) == 800
    assert rank0(counts, 800, "ranks_in") == [out[0], out[0]]  # every peer routes alike
    local = rank0(torch.zeros(4), 2 * out[0], "experts")  # rank 0's 4 experts, from both sources
    assert local == split_rows(2 * out[0], routing.loads[:4])
    assert rank0(torch.zeros(8), 16, "experts") == split_rows(16, routing.loads)
    assert AssumedRouting(8).loads == [0.125] * 8


@pytest.mark.parametrize("imbalance", [0.5, 9.0])
def test_an_impossible_imbalance_is_one_line(imbalance: float) -> None:
    with pytest.raises(UserError, match=r"--imbalance .* is outside \[1, 8\]: 1 is balanced"):
        AssumedRouting(8, imbalance)


def test_gpu_kinds_and_custom_specs() -> None:
    assert parse_gpu("h100-80gb") is KNOWN["h100-80gb"]
    assert KNOWN["h200-141gb"].memory == 143_771 * 1024**2
    custom = parse_gpu("custom:memory_gib=24,tflops=100,network_gbps=25")
    assert (custom.memory, custom.peak_flops, custom.network) == (24 * GIB, 100e12, 25e9)
    assert custom.hbm == KNOWN["h100-80gb"].hbm  # the rest from an H100
    with pytest.raises(UserError, match="--gpu: unknown GPU kind 'h100'; use one of h100-80gb, h200-141gb"):
        parse_gpu("h100")
    with pytest.raises(UserError, match="unknown key 'mem' in 'custom:mem=3'; keys: memory_gib"):
        parse_gpu("custom:mem=3")
    with pytest.raises(UserError, match="tflops='x' is not a number"):
        parse_gpu("custom:tflops=x")


def test_layouts_parse_from_the_config_and_name_themselves() -> None:
    cfg = load_config(MIXTRAL)
    own = parse_layout("", cfg)
    assert own == JobLayout(8, "deepspeed", 2, 1, 8, True) and own.name == "ep8/zero2/mb1x8/ac"
    layout = parse_layout("ep4/ddp/mb2x4/noac", cfg)
    assert layout == JobLayout(4, "ddp", 0, 2, 4, False)
    assert layout.apply(cfg).parallel.ep_size == 4 and layout.apply(cfg).train.grad_accum_steps == 4
    assert "parallel.backend=ddp" in layout.overrides()
    with pytest.raises(UserError, match="--layouts: cannot read 'zero3' in 'ep8/zero3'; spell a layout as"):
        parse_layout("ep8/zero3", cfg)


def test_an_ep_size_that_divides_neither_experts_nor_world_is_one_line() -> None:
    cfg = load_config(MIXTRAL)
    with pytest.raises(
        UserError, match="ep_size 3 must divide both the 8 experts and the 16 GPUs; use one of 1, 2, 4, 8"
    ):
        check_layout(parse_layout("ep3", cfg), cfg, 16)
    with pytest.raises(
        UserError, match="ep_size 8 must divide both the 8 experts and the 12 GPUs; use one of 1, 2, 4"
    ):
        check_layout(parse_layout("ep8", cfg), cfg, 12)


def test_a_world_that_is_not_whole_nodes_is_one_line() -> None:
    job = Job(load_config(MIXTRAL), 12, 8, KNOWN["h100-80gb"])
    with pytest.raises(
        UserError, match="--gpus 12 is not a multiple of --gpus-per-node 8: .* use 8 or 16 GPUs"
    ):
        job.check()
    Job(load_config(MIXTRAL), 4, 8, KNOWN["h100-80gb"]).check()  # part of one node is fine


def test_auto_layouts_start_with_the_configs_own() -> None:
    cfg = load_config(MIXTRAL)
    names = [layout.name for layout in auto_layouts(cfg, 16, 8)]
    assert names == [
        "ep8/zero2/mb1x8/ac",
        "ep8/zero2/mb1x8/noac",
        "ep8/ddp/mb1x8/ac",
        "ep4/zero2/mb1x8/ac",
        "ep4/zero2/mb1x8/noac",
        "ep4/ddp/mb1x8/ac",
    ]


def test_depths_rehearse_two_repeats_of_the_block_pattern() -> None:
    cfg = load_config(MIXTRAL)
    assert depths(cfg.model) == (1, 2)
    pattern = cfg.replace(
        model=cfg.model.__class__(
            **{**cfg.model.__dict__, "first_dense_layers": 1, "moe_layer_freq": 2, "num_layers": 31}
        )
    )
    assert depths(pattern.model) == (3, 5)  # 1 dense, then (dense, MoE) pairs
    short = cfg.replace(model=cfg.model.__class__(**{**cfg.model.__dict__, "num_layers": 3}))
    assert depths(short.model) == (3,)


def test_grouped_gemm_and_attention_flop_formulas() -> None:
    # forward: each of 10 rows meets one [4, 6] matrix; weight gradient: [4, 10] @ [10, 6] split by rows
    assert _grouped_mm_flops(torch.empty(10, 4), torch.empty(3, 4, 6)) == 2 * 10 * 4 * 6
    assert _grouped_mm_flops(torch.empty(4, 10), torch.empty(10, 6)) == 2 * 4 * 10 * 6
    q = torch.empty(2, 4, 16, 8)  # B, heads, T, d
    assert _sdpa_flops(q, q, backward=False) == 2 * 2 * (2 * 4 * 16 * 16 * 8)
    assert _sdpa_flops(q, q, backward=True) == 2 * 2 * 2 * (2 * 4 * 16 * 16 * 8)
