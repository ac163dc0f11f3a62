"""MFU arithmetic, the CPU peak estimate, and the training RNG kept apart from everything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_lm.config import Config, LoggingConfig, load_config
from moe_lm.model.params import FlopsPerToken, flops_per_token
from moe_lm.train.metrics import cpu_matmul_peak, mfu, peak_flops
from moe_lm.train.rng import TrainingRNG


def test_cpu_peak_is_the_fastest_of_several_probes() -> None:
    # start/end of each probe: they took 0.4 s, 0.1 s (the machine was quiet) and 0.25 s
    clock = iter([0.0, 0.4, 1.0, 1.1, 2.0, 2.25]).__next__
    peak = cpu_matmul_peak(probes=3, size=64, clock=clock)
    assert peak == pytest.approx(2 * 64**3 / 0.1)


def test_peak_probe_draws_nothing_from_the_global_rng() -> None:
    before = torch.get_rng_state()
    assert peak_flops(Config(), torch.device("cpu")) > 0
    assert torch.equal(torch.get_rng_state(), before)


def test_configured_peak_is_per_process() -> None:
    cfg = Config(logging=LoggingConfig(peak_tflops=2.0))
    assert peak_flops(cfg, torch.device("cpu")) == 2e12


def test_mfu_is_global_flops_over_every_process_peak() -> None:
    one = mfu(flops_per_step=6e12, seconds=2.0, peak_per_process=1e13, processes=1)
    assert one == pytest.approx(0.3)
    # Two processes doing the same work each in the same time: twice the FLOPs, the same MFU.
    assert mfu(12e12, 2.0, 1e13, 2) == pytest.approx(one)


def test_flops_per_token_is_palms_formula() -> None:
    # The one formula behind `moe-lm info` and MFU. Mixtral 8x7B: 32 layers, 32 heads of 128.
    m = load_config(Path(__file__).parents[2] / "configs" / "mixtral-8x7b.yaml").model
    flops = flops_per_token(m, 4096, active_params=1000)
    assert flops == FlopsPerToken(forward=2000, train=6000, attention_train=12 * 32 * 32 * 128 * 4096)
    assert flops.train_total == 6000 + 12 * 32 * 32 * 128 * 4096


def test_training_rng_ignores_draws_between_steps() -> None:
    def steps(disturb: bool) -> list[torch.Tensor]:
        rng, out = TrainingRNG(7, torch.device("cpu")), []
        for _ in range(3):
            with rng.active():
                out.append(torch.rand(4))
            if disturb:
                torch.randn(100)  # evaluation, sampling, a library: not the training stream
        return out

    quiet, disturbed = steps(False), steps(True)
    assert all(torch.equal(a, b) for a, b in zip(quiet, disturbed))
    torch.manual_seed(7)
    assert torch.equal(quiet[0], torch.rand(4))  # the stream is seed 7's


def test_training_rng_state_round_trip_and_global_state_kept() -> None:
    rng = TrainingRNG(3, torch.device("cpu"))
    with rng.active():
        torch.rand(5)
    saved = rng.state_dict()
    with rng.active():
        expected = torch.rand(5)
    restored = TrainingRNG(99, torch.device("cpu"))
    restored.load_state_dict(saved)
    outside = torch.get_rng_state()
    with restored.active():
        assert torch.equal(torch.rand(5), expected)
    assert torch.equal(torch.get_rng_state(), outside)
