"""What a rehearsal puts where a real job has a device, a launcher or data (moe_lm/plan/rehearsal.py)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._tools.mem_tracker import MemTracker

from moe_lm.config import Config
from moe_lm.parallel.backend import Backend
from moe_lm.train.step import forward

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


class StandInAccelerator:
    """What the backends ask accelerate for, without binding the process to a device."""

    def __init__(self, precision: str, world_size: int, local_main: bool, autocast: bool) -> None:
        self.device = torch.device("cpu")  # fake CPU tensors stand for the GPU's (moe_lm/plan/fake.py)
        self.num_processes = world_size
        self.is_local_main_process = local_main
        self.scaler = None
        self._dtype = DTYPES[precision] if autocast else torch.float32

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self._dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # no DDP module: its all-reduce is arithmetic

    def unscale_gradients(self) -> None:
        pass

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        return model, optimizer

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor / self.num_processes if reduction == "mean" else tensor

    def wait_for_everyone(self) -> None:
        pass

    def end_training(self) -> None:
        pass


class PeakTracker(MemTracker):
    """torch's MemTracker (device memory by category: parameters, gradients, optimizer state,
    activations, temporaries) keeping only the device-wide peak: its per-module peaks walk every
    module the step has run, on every op, which made a 32-layer rehearsal take minutes."""

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)

    def take_peak(self) -> dict[str, int]:
        """The peak snapshot since the last call (summed over devices); the peak restarts from now."""
        peak: dict[str, int] = {}
        for snap in self._peak_mem_snap.values():
            for key, value in snap.items():
                name = str(getattr(key, "value", key))
                peak[name] = peak.get(name, 0) + value
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._curr_mem_snap.items()}
        self._peak_mem_snap = {dev: dict(snap) for dev, snap in self._curr_mem_snap.items()}
        return peak


class ZeroBlocks:
    """Validation blocks for the evaluation pass: token id 0 everywhere (only shapes matter)."""

    def __init__(self, count: int, block_len: int) -> None:
        self.count, self.block_len = count, block_len

    def __len__(self) -> int:
        return self.count

    def read(self, idx: np.ndarray) -> np.ndarray:
        return np.zeros((len(idx), self.block_len), dtype=np.int64)


@dataclass
class Run:
    """What `evaluate` asks a trainer for."""

    cfg: Config
    backend: Backend
    data: Any
    step: int = 0
    tokens: int = 0
    chat: Any = None  # a chat encoder for conversation data; a rehearsal evaluates plain blocks

    def forward(self, model: Any, batch: Any, labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return forward(self.cfg, self.backend.device, 0, model, batch, labels, **kwargs)


class ValidationData:
    """One validation micro-batch per rank, for the evaluation pass."""

    def __init__(self, seq_len: int, world_size: int, micro_batch_size: int) -> None:
        self.val = {"val": ZeroBlocks(micro_batch_size * world_size, seq_len + 1)}
