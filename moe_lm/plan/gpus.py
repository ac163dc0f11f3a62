"""What a plan knows about GPUs: memory, dense bf16 peak, and the bandwidths its roofline uses.

Figures are the vendors' spec sheets for the SXM parts (dense, without sparsity; fp32 without tensor
cores: torch's default, TF32 off for matmuls, which moe_lm keeps); bandwidths are
per GPU and per direction: NVLink 4 (H100/H200) 450 GB/s, NVLink 3 (A100) 300 GB/s; the network is
one 400 Gb/s (H100/H200) or 200 Gb/s (A100) InfiniBand port per GPU. `--gpu custom:...` sets any of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from moe_lm.errors import UserError

GIB = 1024**3
MIB = 1024**2


def size(n: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / GIB:.1f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int  # bytes the device reports (torch.cuda.get_device_properties().total_memory)
    peak_flops: float  # dense bf16 FLOP/s
    hbm: float  # memory bandwidth, bytes/s
    nvlink: float  # bytes/s per direction to a GPU of the same node
    network: float  # bytes/s per direction to another node
    fp32_flops: (
        float  # dense fp32 FLOP/s: what an op with fp32 output runs at (a run without mixed precision)
    )
    device_type: str = "cuda"  # "cpu": a plan of a CPU run (its own precision, kernels and experts path)

    def describe(self) -> str:
        return (
            f"{self.name}: {self.memory / GIB:.1f} GiB, {self.peak_flops / 1e12:.0f} TFLOP/s bf16 dense "
            f"({self.fp32_flops / 1e12:.1f} fp32), "
            f"HBM {self.hbm / 1e12:.2f} TB/s, NVLink {self.nvlink / 1e9:.0f} GB/s, "
            f"network {self.network / 1e9:.0f} GB/s (per GPU, per direction)"
        )


KNOWN = {
    "h100-80gb": GPU("h100-80gb", 81_559 * MIB, 989e12, 3.35e12, 450e9, 50e9, 67e12),
    "h200-141gb": GPU("h200-141gb", 143_771 * MIB, 989e12, 4.8e12, 450e9, 50e9, 67e12),
    "a100-80gb": GPU("a100-80gb", 81_920 * MIB, 312e12, 2.039e12, 300e9, 25e9, 19.5e12),
    "a100-40gb": GPU("a100-40gb", 40_960 * MIB, 312e12, 1.555e12, 300e9, 25e9, 19.5e12),
}

# custom:KEY=VALUE,... units
_CUSTOM = {
    "memory_gib": ("memory", GIB),
    "tflops": ("peak_flops", 1e12),
    "fp32_tflops": ("fp32_flops", 1e12),
    "hbm_tbps": ("hbm", 1e12),
    "nvlink_gbps": ("nvlink", 1e9),
    "network_gbps": ("network", 1e9),
}
_CUSTOM_HELP = "custom:memory_gib=80,tflops=989,fp32_tflops=67,hbm_tbps=3.35,nvlink_gbps=450,network_gbps=50"


def cpu_target(memory: int) -> GPU:
    """A CPU process as the target of a rehearsal (the memory checks of docs/plan.md compare it with
    real CPU runs); its speed figures are placeholders no report shows."""
    return GPU("cpu", memory, 1e12, 1e11, 1e10, 1e10, 1e12, device_type="cpu")


def parse_gpu(spec: str) -> GPU:
    """A known name, or `custom:` with any of memory_gib, tflops, fp32_tflops, hbm_tbps,
    nvlink_gbps, network_gbps (the rest from h100-80gb)."""
    if spec in KNOWN:
        return KNOWN[spec]
    if not spec.startswith("custom:"):
        raise UserError(f"--gpu: unknown GPU kind '{spec}'; use one of {', '.join(KNOWN)} or {_CUSTOM_HELP}")
    gpu = replace(KNOWN["h100-80gb"], name="custom")
    for item in filter(None, spec[len("custom:") :].split(",")):
        key, _, raw = item.partition("=")
        if key not in _CUSTOM:
            raise UserError(f"--gpu: unknown key '{key}' in '{spec}'; keys: {', '.join(_CUSTOM)}")
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"--gpu: {key}={raw!r} is not a number (e.g. {_CUSTOM_HELP})") from None
        if not math.isfinite(value) or value <= 0:  # nan or inf: a plan of NaN seconds, or a traceback
            raise UserError(f"--gpu: {key} must be a positive finite number, got {raw}")
        field_name, unit = _CUSTOM[key]
        values: dict[str, Any] = {field_name: int(value * unit) if field_name == "memory" else value * unit}
        gpu = replace(gpu, **values)
    return gpu
