"""The fake machine a rehearsal runs on: a fake process group of the target world, fake tensors
(shape, dtype and device, no storage), and one dispatch mode that answers what fake tensors cannot
and counts what the step does.

Why fake *CPU* tensors stand in for the GPU's: a backward pass over fake CUDA tensors needs a CUDA
device in every build of torch (the CUDA build without a GPU stops in the autograd engine with
"hasPrimaryContext expects a valid device index"; the CPU build cannot even index a fake CUDA
tensor, and entering CUDA autocast aborts the process). Fake CPU tensors run every op, forward and
backward, with the shapes and dtypes the GPU would see. What differs on a GPU is decided the GPU's
way (moe_lm/plan/rehearsal.py): the experts' implementation by the code's own check on a fake CUDA
tensor, autocast's dtype, and the attention kernel (`RehearsalMode.attention`).

`RehearsalMode` (above FakeTensorMode, below the memory tracker) answers:
  - `bincount(x, minlength=n)`: n entries. Its length depends on the data; routing indices are
    always < the number of experts, so it is minlength;
  - reads of a value (`float(t)`, `bool(t)`, `int(t)`): a stated default (1.0, True, 1), with the
    place in moe_lm that asked, so a host sync in the step shows up (the routing counts do not come
    here: they go through their seam, moe_lm/model/split_sizes.py);
  - the SDPA kernel choice: the GPU's (flash attention in bf16/fp16 without a mask, memory-efficient
    with one), not the CPU's;
and counts, while `counting` is on: FLOPs of every GEMM and attention op, a roofline time per op
(max of FLOPs over peak and bytes over memory bandwidth), and bytes per collective.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
_PLAN = os.path.dirname(os.path.abspath(__file__))
_MOE_LM = os.path.dirname(_PLAN)

# c10d op -> the collective kind the report names
_COLLECTIVES = {
    "alltoall_base_": "all_to_all",
    "alltoall_": "all_to_all",
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "reduce_scatter_": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "allgather_": "all_gather",
    "_allgather_base_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "broadcast_": "broadcast",
}


def _grouped_mm_flops(a: torch.Tensor, b: torch.Tensor) -> int:
    """2·m·k·n summed over the groups: each row meets only its own group's matrix."""
    if a.dim() == 2 and b.dim() == 2:  # groups along the reduction dim (weight gradients): [m, K] @ [K, n]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if a.dim() == 2:  # groups of rows, one [k, n] matrix each: [M, k] @ [G, k, n]
        return 2 * a.shape[0] * a.shape[1] * b.shape[-1]
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[-1]  # batched: [G, m, k] @ [G, k, n]


def _sdpa_flops(q: torch.Tensor, k: torch.Tensor, backward: bool) -> int:
    """QK^T and PV over the full causal square (as `flops_per_token` and torch's flop counter count
    it); backward twice the forward (dQ, dK, dV, dP; the flash kernel's recomputed P is not counted)."""
    b, h, s_q, d = q.shape
    s_k = k.shape[-2]
    forward = 2 * (2 * b * h * s_q * s_k * d)
    return 2 * forward if backward else forward


_OUT_OF_PLACE = {aten.addmm_: aten.addmm, aten.baddbmm_: aten.baddbmm}


def _op_flops(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    packet = func.overloadpacket
    if packet is aten._grouped_mm:
        return _grouped_mm_flops(args[0], args[1])
    name = packet.__name__
    if name.startswith("_scaled_dot_product") and "attention" in name:
        if name.endswith("_backward"):
            return _sdpa_flops(args[1], args[2], True)
        return _sdpa_flops(args[0], args[1], False)
    # torch's registry has no in-place GEMMs; the CPU loop experts accumulate weight gradients with addmm_
    formula = flop_registry.get(_OUT_OF_PLACE.get(packet, packet))
    return 0 if formula is None else int(formula(*args, **kwargs, out_val=out))


def _nbytes(values: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor))


def _caller() -> str:
    """The innermost moe_lm frame (file:line) below this dispatch."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if frame.filename.startswith(_MOE_LM) and not frame.filename.startswith(_PLAN):
            return f"{os.path.relpath(frame.filename, os.path.dirname(_MOE_LM))}:{frame.lineno}"
    return "outside moe_lm"


@dataclass
class Counts:
    """What a phase of the rehearsal did on this rank."""

    flops: int = 0
    roofline_seconds: float = 0.0  # sum over ops of max(FLOPs / peak, bytes / memory bandwidth)
    collective_bytes: Counter[str] = field(default_factory=Counter)  # kind -> bytes handed to it
    all_to_all_received: int = 0  # bytes the all-to-alls brought to this rank
    host_reads: Counter[str] = field(default_factory=Counter)  # file:line -> values read
    grouped_mm_calls: int = 0
    attention_kernels: Counter[str] = field(default_factory=Counter)


class RehearsalMode(TorchDispatchMode):
    def __init__(
        self,
        peak_flops: float,
        memory_bandwidth: float,
        half_precision_attention: bool,
        gpu_attention: bool = True,
        fp32_flops: float | None = None,
    ) -> None:
        super().__init__()
        self.peak_flops, self.memory_bandwidth = peak_flops, memory_bandwidth
        self.fp32_flops = peak_flops if fp32_flops is None else fp32_flops  # ops with fp32 output
        self.half_attention = half_precision_attention
        self.gpu_attention = gpu_attention  # False: a plan of a CPU run keeps the CPU's own choice
        self.counts: Counts | None = None  # counting off

    @contextmanager
    def counting(self) -> Iterator[Counts]:
        previous, self.counts = self.counts, Counts()
        try:
            yield self.counts
        finally:
            self.counts = previous

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is aten.bincount:
            minlength = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            return args[0].new_empty((minlength,), dtype=torch.long)
        if packet is aten._local_scalar_dense:
            return self._read(args[0])
        if packet is aten._fused_sdp_choice and self.gpu_attention:
            return self._attention_choice(args, kwargs)
        out = func(*args, **kwargs)
        if self.counts is not None:
            self._count(func, args, kwargs, out)
        return out

    def _read(self, t: torch.Tensor) -> Any:
        if self.counts is not None:
            self.counts.host_reads[_caller()] += 1
        if t.dtype == torch.bool:
            return True
        return 1.0 if t.dtype.is_floating_point else 1

    def _attention_choice(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        # torch.nn.attention.SDPBackend: MATH 0, FLASH 1, EFFICIENT 2. On an H100/A100 in bf16,
        # causal attention without a mask runs the flash kernel, with a mask the efficient one.
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if not self.half_attention:
            return 0
        return 1 if mask is None else 2

    def _count(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        counts = self.counts
        assert counts is not None
        packet = func.overloadpacket
        if func.namespace == "c10d":
            kind = _COLLECTIVES.get(packet.__name__)
            if kind is not None:
                sent = args[1] if kind == "all_to_all" else args[0]
                counts.collective_bytes[kind] += _nbytes(sent)
                if kind == "all_to_all":
                    counts.all_to_all_received += _nbytes(args[0])
            return
        if packet is aten._grouped_mm:
            counts.grouped_mm_calls += 1
        name = packet.__name__
        if name.startswith("_scaled_dot_product") and not name.endswith("_backward"):
            counts.attention_kernels[name] += 1
        flops = _op_flops(func, args, kwargs, out)
        counts.flops += flops
        moved = _nbytes(args) + _nbytes(kwargs) + _nbytes(out)
        # a GEMM in fp32 (no mixed precision, or an op autocast leaves in fp32) runs at the fp32 rate
        peak = self.fp32_flops if _floating_dtype(out) == torch.float32 else self.peak_flops
        counts.roofline_seconds += max(flops / peak, moved / self.memory_bandwidth)


def _floating_dtype(out: Any) -> torch.dtype | None:
    """The dtype of an op's first floating-point output."""
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            return t.dtype
    return None


@contextmanager
def fake_world(world_size: int, rank: int) -> Iterator[None]:
    """This process as rank `rank` of a fake process group of `world_size` ranks: collectives
    return at once and move nothing. Refused inside a real process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a rehearsal needs a process of its own: a process group is already running")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
