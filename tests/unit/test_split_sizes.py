"""The routing counts' seam (moe_lm/model/split_sizes.py) and the experts' path under bf16 autocast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_lm.model.dispatch import LocalDispatcher
from moe_lm.model.experts import Experts
from moe_lm.model.split_sizes import Over, assumed_splits, split_sizes


@contextmanager
def autocast_flags(device: str, dtype: torch.dtype) -> Iterator[None]:
    """The autocast state `torch.autocast(device, dtype)` sets, without running any op (on a CPU
    build of torch, entering CUDA autocast itself is refused)."""
    before = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    torch.set_autocast_enabled(device, True)
    torch.set_autocast_dtype(device, dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled(device, before[0])
        torch.set_autocast_dtype(device, before[1])


def test_cuda_bf16_autocast_takes_the_grouped_gemm_with_fp32_activations() -> None:
    # Regression: the DDP backend's bf16 autocast hands the MoE layer fp32 activations; the check
    # asked for x.dtype == bf16, so CUDA ran the per-expert loop (and its host sync) instead.
    experts = Experts(4, 64, 96, impl="auto")
    with FakeTensorMode():
        x_TH = torch.empty(8, 64, device="cuda")  # fp32, as autocast leaves the residual stream
    assert not experts.uses_grouped_mm(x_TH)  # no autocast: fp32 takes the loop
    with autocast_flags("cuda", torch.bfloat16):
        assert experts.uses_grouped_mm(x_TH)
    with autocast_flags("cuda", torch.float16):
        assert not experts.uses_grouped_mm(x_TH)  # the grouped kernel is bf16 only
    with autocast_flags("cuda", torch.bfloat16):
        odd = Experts(4, 60, 90, impl="auto")  # 90 * 2 bytes is no multiple of 16
        assert not odd.uses_grouped_mm(x_TH.new_empty(8, 60))


def test_grouped_path_computes_in_the_autocast_dtype() -> None:
    torch.manual_seed(0)
    experts = Experts(4, 16, 32, impl="grouped_mm")
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x_TH = torch.randn(24, 16)
    idx_TK = torch.randint(0, 4, (24, 2))
    w_TK = torch.softmax(torch.randn(24, 2), -1)
    with torch.autocast("cpu", torch.bfloat16):
        y_TH, _ = LocalDispatcher()(x_TH, idx_TK, w_TK, experts, 4, None)
    reference = Experts(4, 16, 32, impl="grouped_mm").to(torch.bfloat16)
    reference.load_state_dict(experts.state_dict())
    y_ref, _ = LocalDispatcher()(x_TH.bfloat16(), idx_TK, w_TK, reference, 4, None)
    assert y_TH.dtype == torch.bfloat16  # before the fix: fp32 GEMMs under a bf16 autocast
    assert torch.equal(y_TH, y_ref)


def test_the_loop_path_reads_its_split_sizes_only_through_the_seam() -> None:
    torch.manual_seed(0)
    experts = Experts(4, 16, 32, impl="loop")
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x_TH = torch.randn(10, 16)
    idx_TK = torch.tensor([[0, 1]] * 6 + [[2, 1]] * 4)
    w_TK = torch.full((10, 2), 0.5)
    asked: list[tuple[int, int, Over]] = []

    def reader(counts: torch.Tensor, rows: int, over: Over) -> list[int]:
        asked.append((counts.numel(), rows, over))
        return [6, 10, 4, 0]  # what the device holds, answered without reading it

    expected, _ = LocalDispatcher()(x_TH, idx_TK, w_TK, experts, 4, None)
    with assumed_splits(reader):
        got, _ = LocalDispatcher()(x_TH, idx_TK, w_TK, experts, 4, None)
        assert split_sizes(torch.tensor([1, 2]), 3, "ranks_in") == [6, 10, 4, 0]
    assert asked == [(4, 20, "experts"), (2, 3, "ranks_in")]
    assert torch.equal(got, expected)
    assert split_sizes(torch.tensor([1, 2]), 3, "ranks_out") == [1, 2]  # outside: the device's values
