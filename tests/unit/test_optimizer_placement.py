"""Where a resumed optimizer's state tensors go (moe_lm/parallel/backend.py `placed_state`).

The fused AdamW kernel on CUDA refuses a step tensor on the CPU; the first resume on a GPU
(scripts/gpu_check.py, H200) failed with "state_steps is on cpu, different from other tensors on
cuda:0". The meta device stands in for the GPU here: placement is all that is checked."""

from __future__ import annotations

import torch

from moe_lm.parallel.backend import placed_state


def test_a_fused_or_capturable_groups_step_goes_to_the_parameters_device_as_float32() -> None:
    param = torch.empty(3, device="meta")
    for group in ({"fused": True}, {"capturable": True}):
        step = placed_state("step", torch.tensor(7, dtype=torch.int64), param, group)
        assert step.device == param.device and step.dtype == torch.float32


def test_a_plain_groups_step_stays_a_cpu_float32_and_moments_follow_the_parameter() -> None:
    param = torch.empty(3, device="meta")
    group = {"fused": False, "capturable": False}
    step = placed_state("step", torch.tensor(7.0), param, group)
    assert step.device == torch.device("cpu") and step.dtype == torch.float32 and float(step) == 7.0
    moment = placed_state("exp_avg", torch.zeros(3), param, group)
    assert moment.device == param.device
