"""The numbers in a train record that take more than a division: MFU against a peak, and the
router's load per layer and expert. The records themselves are made by the callbacks
(`moe_lm/train/callbacks.py`) and written by the sinks (`moe_lm/train/sinks.py`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from moe_lm.config import Config

# bf16 dense peak (TFLOP/s) of accelerators we know; MFU is relative to this.
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops(cfg: Config, device: torch.device) -> float:
    """One process's FLOP/s that MFU is measured against: configured, a known GPU's bf16 peak, or
    on CPU an estimate (there is no spec sheet to read: the best of several matmul probes)."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return 312e12
    return cpu_matmul_peak()


def cpu_matmul_peak(
    probes: int = 5, size: int = 1024, clock: Callable[[], float] = time.perf_counter
) -> float:
    """FLOP/s of the fastest of `probes` fp32 size x size matmuls. One probe swung 10x with the
    load of the moment; the fastest is the least disturbed. Draws no random numbers (exact resume)."""
    a = torch.full((size, size), 0.5)
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)  # warm-up: first-call allocation and thread start
    best = math.inf
    for _ in range(probes):
        start = clock()
        torch.mm(a, a, out=out)
        best = min(best, clock() - start)
    return 2 * size**3 / max(best, 1e-9)


def mfu(flops_per_step: float, seconds: float, peak_per_process: float, processes: int) -> float:
    """Model FLOPs utilisation: the FLOPs of one step summed over every process, over the peak of
    every process for the step's duration (global over global, so it stays ≤ 1 at any scale)."""
    return flops_per_step / seconds / (peak_per_process * processes)


def router_metrics(counts_LE: torch.Tensor, dropped_L: torch.Tensor, top_k: int) -> dict[str, Any]:
    """Per-layer per-expert load fractions, imbalance (max/mean) and dropped fraction, from global counts."""
    counts_LE = counts_LE.double()
    totals_L = counts_LE.sum(dim=1).clamp_min(1)
    load_LE = counts_LE / totals_L[:, None]
    imbalance_L = counts_LE.max(dim=1).values / (counts_LE.mean(dim=1).clamp_min(1e-9))
    return {
        "expert_load": [[round(float(v), 5) for v in row] for row in load_LE],
        "imbalance": [round(float(v), 4) for v in imbalance_L],
        "dropped_frac": float(dropped_L.double().sum() / totals_L.sum()),
        "dropped_frac_per_layer": [round(float(v), 5) for v in dropped_L.double() / totals_L],
    }
