"""The GPU code path on fake tensors: configs/gpu-check.yaml and configs/moe-1b.yaml rehearsed in bf16
at world sizes 1, 8 and 64 (EP 8; DDP and ZeRO-2) through the trainer's own step, evaluation,
sampling and the checkpoint read-out (moe_lm/plan/rehearsal.py)."""

from __future__ import annotations

import pytest
import torch

from moe_lm.config import load_config
from moe_lm.model.params import count_params, flops_per_token
from moe_lm.plan.gpus import KNOWN
from moe_lm.plan.layouts import parse_layout
from moe_lm.plan.rehearsal import Rehearsal, rehearse
from moe_lm.plan.routing import AssumedRouting
from tests.integration.conftest import REPO

H100 = KNOWN["h100-80gb"]


def _rehearse(
    config: str, world: int, layout: str, imbalance: float = 1.0, **kw: bool
) -> tuple[Rehearsal, object]:
    cfg = load_config(REPO / "configs" / f"{config}.yaml")
    cfg = parse_layout(layout, cfg).apply(cfg)
    return rehearse(cfg, world, H100, AssumedRouting(cfg.model.num_experts, imbalance), **kw), cfg


CASES = [
    ("gpu-check", 1, "ep1/ddp"),
    ("gpu-check", 8, "ep8/ddp/ac"),
    ("gpu-check", 64, "ep8/zero2"),
    ("moe-1b", 1, "ep1/ddp/mb1x2"),
    ("moe-1b", 8, "ep8/zero2/mb1x2/ac"),
    ("moe-1b", 64, "ep8/ddp/mb1x2"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("config", "world", "layout"), CASES)
def test_shipped_configs_rehearse_the_gpu_path(config: str, world: int, layout: str) -> None:
    r, cfg = _rehearse(config, world, layout)
    moe_layers = len(cfg.model.moe_layer_indices)
    ep = cfg.parallel.ep_size
    # bf16 autocast (DDP) and bf16 weights (DeepSpeed) both take the grouped GEMM on a GPU
    assert r.experts_impl == "grouped_mm"
    assert r.attention == "flash attention"
    # The step reads the device only through the routing seam (2 reads per MoE layer under EP, again
    # in the recomputation of checkpointing; none without EP: the grouped GEMM needs no split sizes
    # on the host) and in DDPBackend.step (the norm and whether it is finite).
    recompute = 2 if cfg.train.activation_checkpointing else 1
    assert r.seam_reads == (2 * moe_layers * recompute if ep > 1 else 0)
    if cfg.parallel.backend == "ddp":
        assert {site.split(":")[0] for site in r.host_reads} == {"moe_lm/parallel/backend.py"}
        assert sum(r.host_reads.values()) == 2
    assert r.memory["parameters"] > 0 and r.memory["optimizer"] > 0 and r.memory["activations"] > 0
    assert ("all_to_all" in r.traffic) == (ep > 1)
    assert r.checkpoint_bytes > 0


@pytest.mark.slow
def test_ddp_all_reduce_and_zero_partitions_are_exact_arithmetic() -> None:
    r, cfg = _rehearse("moe-1b", 64, "ep8/ddp/mb1x2")
    parts = count_params(cfg.model).components
    dense = sum(n for k, n in parts.items() if k != "experts")
    # DDP all-reduces the dense fp32 gradients; moe_lm all-reduces each rank's expert gradients
    # over its 8 expert-data-parallel peers, plus the 2-float norm exchange over the EP group.
    experts_here = parts["experts"] // 8
    assert r.traffic["all_reduce"] == 4 * dense + 4 * experts_here + 4
    assert r.overlapped == {"all_reduce": 4 * dense}
    z, gc = _rehearse("gpu-check", 64, "ep8/zero2")
    parts = count_params(gc.model).components
    dense, experts_here = sum(n for k, n in parts.items() if k != "experts"), parts["experts"] // 8
    # ZeRO partitions: dense groups over 64 ranks, expert groups over the 8 holding the same experts
    assert abs(z.zero_partition - (dense / 64 + experts_here / 8)) <= 4  # ceil per optimizer group


@pytest.mark.slow
def test_depth_extrapolation_equals_a_full_depth_rehearsal() -> None:
    short, _ = _rehearse("gpu-check", 8, "ep8/ddp/ac", imbalance=4.0)
    full, _ = _rehearse("gpu-check", 8, "ep8/ddp/ac", imbalance=4.0, full_depth=True)
    assert short.depths == (1, 2) and full.depths == (8,)
    for name in (
        "flops",
        "traffic",
        "all_to_all_received",
        "checkpoint_bytes",
        "host_bytes_at_save",
        "seam_reads",
    ):
        assert getattr(short, name) == getattr(full, name), name
    # Memory to the byte but for a few small tensors alive at the peak (24 bytes of 3.8 GB seen)
    for phase, peak in full.phase_peaks.items():
        assert abs(short.phase_peaks[phase] - peak) <= 64, phase
    for category, size in full.memory.items():
        assert abs(short.memory[category] - size) <= 64, category
    # Seen 1.4e-4 apart (relative) after some other rehearsals in the same process, 1e-6 alone; the
    # cause of that order dependence is not found yet. Extrapolating wrongly moves it by percents.
    assert short.roofline_seconds == pytest.approx(full.roofline_seconds, rel=1e-3)


@pytest.mark.slow
def test_zero2_memory_is_the_partitioned_state_and_two_full_reduce_buckets() -> None:
    z, cfg = _rehearse("gpu-check", 64, "ep8/zero2")
    parts = count_params(cfg.model).components
    dense, experts_here = sum(n for k, n in parts.items() if k != "experts"), parts["experts"] // 8
    partition = dense / 64 + experts_here / 8  # as DeepSpeed partitions moe_lm's groups (to a ceil each)
    # bf16 weights (the engine's dtype), and the model's buffers (64 B)
    assert 0 <= z.memory["parameters"] - 2 * (dense + experts_here) <= 1024
    # fp32 master weights and AdamW's two moments of the partition
    assert abs(z.memory["optimizer"] - 12 * partition) <= 12 * 4
    # the fp32 averaged gradients of the partition, and no whole bf16 gradient: DeepSpeed's two
    # (overlap_comm) bf16 reduce buckets of reduce_bucket_size = 5e8 elements instead, allocated at
    # that size even for this 0.1B-parameter model (stage_1_and_2.py, setup_buckets)
    assert abs(z.memory["gradients"] - (4 * partition + 2 * 2 * 500_000_000)) <= 4 * 4


@pytest.mark.slow
def test_zero1_keeps_the_bf16_gradients_and_one_full_reduce_bucket() -> None:
    z, cfg = _rehearse("gpu-check", 64, "ep8/zero1")
    parts = count_params(cfg.model).components
    dense, experts_here = sum(n for k, n in parts.items() if k != "experts"), parts["experts"] // 8
    partition = dense / 64 + experts_here / 8
    # the fp32 averaged gradients of the partition and the one bf16 bucket of 5e8 elements DeepSpeed
    # allocates under contiguous_gradients (its default), besides the bf16 gradients the rehearsal
    # holds at the peak (none of them at this config's peak, in the backward)
    arithmetic = 4 * partition + 2 * 500_000_000
    assert 0 <= z.memory["gradients"] - arithmetic <= 2 * (dense + experts_here) + 1024


@pytest.mark.slow
def test_counted_flops_are_flops_per_token_less_the_embedding_lookup() -> None:
    # flops_per_token counts 6 x every active parameter; the embedding is a lookup, not a GEMM.
    r, cfg = _rehearse("gpu-check", 1, "ep1/ddp")  # no checkpointing: no recomputation
    m = cfg.model
    counts = count_params(m)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
    model = flops_per_token(m, cfg.data.seq_len, counts.active_params).train_total * tokens
    assert abs(r.flops / model - 1) > 0.02  # 10.8% apart: the 8192 x 512 embedding of a 36.7M-active model
    lookup = 6 * counts.components["embedding"] * tokens
    assert abs(r.flops / (model - lookup) - 1) < 0.001


@pytest.mark.slow
def test_the_loop_experts_count_the_flops_of_the_grouped_gemm() -> None:
    # The same GEMMs, one expert at a time: the loop accumulates weight gradients with addmm_, which
    # torch's FLOP formulas leave out (the loop's count was 10.6% low: every CPU and fp32 plan)
    grouped, _ = _rehearse("gpu-check", 1, "ep1/ddp")
    cfg = load_config(REPO / "configs" / "gpu-check.yaml", ["model.experts_impl=loop"])
    loop = rehearse(cfg, 1, H100, AssumedRouting(cfg.model.num_experts))
    assert (grouped.experts_impl, loop.experts_impl) == ("grouped_mm", "loop")
    assert loop.flops == grouped.flops


@pytest.mark.slow
def test_imbalance_loads_the_hot_rank() -> None:
    balanced, _ = _rehearse("gpu-check", 8, "ep8/ddp/ac")
    hot, _ = _rehearse("gpu-check", 8, "ep8/ddp/ac", imbalance=4.0)
    # rank 0 holds the hot expert: the token rows and the gradients of their outputs reach it at 4x
    # the mean, and it sends back 4x the outputs and input gradients (the other exchange of each
    # pair moves its own tokens' rows: unchanged); it computes on them and keeps more activations.
    assert hot.all_to_all_received > 2 * balanced.all_to_all_received
    assert hot.traffic["all_to_all"] > 2 * balanced.traffic["all_to_all"]
    assert hot.memory["activations"] > balanced.memory["activations"]
    assert hot.flops > balanced.flops


def test_fp32_gemms_are_timed_at_the_gpus_fp32_rate() -> None:
    # moe_lm leaves TF32 off: an fp32 GEMM on an H100 runs at 67 TFLOP/s, not the 989 of bf16
    # (a run without mixed precision; mixtral-8x7b's plan in fp32 was 39 s a step, under the 54 s
    # its 3.6 PFLOP take at 67 TFLOP/s)
    from moe_lm.plan.fake import RehearsalMode

    mode = RehearsalMode(H100.peak_flops, 1e30, True, fp32_flops=H100.fp32_flops)  # no memory bound
    flops = 2 * 256**3
    for dtype, rate in ((torch.float32, H100.fp32_flops), (torch.bfloat16, H100.peak_flops)):
        a = torch.ones(256, 256, dtype=dtype)
        with mode, mode.counting() as counts:
            torch.mm(a, a)
        assert counts.flops == flops
        assert counts.roofline_seconds == pytest.approx(flops / rate), dtype


@pytest.mark.slow
def test_ep_token_rows_travel_in_bf16_under_autocast() -> None:
    # Regression: under DDP's bf16 autocast the layer's input is fp32 and its rows were sent in fp32
    # (and their gradients came back in fp32), twice the bytes the bf16 experts need.
    r, cfg = _rehearse("gpu-check", 8, "ep8/ddp/ac")
    rows = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.model.top_k  # balanced: all of rank 0's
    exchange = rows * cfg.model.hidden_size * 2  # bf16
    counts = cfg.model.num_experts * 8  # the int64 counts exchanged before the rows
    # per MoE layer: rows and outputs forward, their gradients backward, and the forward again in
    # checkpointing's recomputation
    per_layer = 4 * exchange + 2 * exchange + 2 * counts
    assert r.traffic["all_to_all"] == len(cfg.model.moe_layer_indices) * per_layer


def test_a_cpu_rehearsal_runs_with_several_torch_threads_and_leaves_their_number() -> None:
    """The CPU experts run slices on worker threads when torch has several; fake tensors exist only
    on the rehearsal's thread (CI's pytest has 2 threads: every CPU plan failed there)."""
    from moe_lm.plan.gpus import GIB, cpu_target

    cfg = load_config(REPO / "configs" / "tiny-shakespeare.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        r = rehearse(cfg, 1, cpu_target(24 * GIB), AssumedRouting(cfg.model.num_experts))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert r.experts_impl == "loop" and r.memory["activations"] > 0
