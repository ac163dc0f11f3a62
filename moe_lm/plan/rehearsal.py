"""Rehearse one rank of a training job on fake tensors: moe_lm's own model, parallelisation and
training step, at the target world size, with no storage allocated.

What runs is the code a real rank runs: the model built from the config, `build_backend`
(expert sharding and the all-to-all dispatcher over the fake process group, global-batch
balancing, activation checkpointing, AdamW over the real parameter groups), the trainer's step
(`moe_lm/train/step.py`: micro-batches, autocast, router losses, backward, the backend's gradient
reduction, global-norm clipping, the optimizer step with its state allocated), the evaluation pass
(`moe_lm/train/evaluation.py`), sampling (`MoETransformer.generate`) and what the checkpoint writer
reads out of the backend (`model_state`, `optimizer_state`).

What stands in, and why (each is printed with the plan):
- accelerate's `Accelerator` (`StandInAccelerator`): accelerate binds a process to a real device;
  the stand-in gives the backend the same autocast, backward and reductions.
- DDP's gradient all-reduce and its buckets: torch's DDP reads parameter data when it is built,
  which fake tensors do not have, so its bytes and its bucket memory are arithmetic on the
  parameters it would manage (moe_lm/plan/arithmetic.py).
- DeepSpeed ZeRO-1/2: the engine cannot run on fake tensors either. The forward and backward run
  as the engine runs them (bf16 weights, no autocast); the fp32 master weights, AdamW moments,
  gradient partitions and buckets are arithmetic on the parameter groups moe_lm hands DeepSpeed.
- The routing counts: from `AssumedRouting` through their seam (moe_lm/model/split_sizes.py).
- The first 2 micro-batches of a step run; FLOPs and traffic of the others are the same, so the
  step's are scaled by grad_accum_steps / 2 (peak memory does not depend on them: gradients
  accumulate in place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_lm.config import Config
from moe_lm.model.experts import Experts
from moe_lm.model.params import build_meta_model
from moe_lm.model.split_sizes import assumed_splits
from moe_lm.parallel.backend import Backend
from moe_lm.parallel.layout import Layout, resolve_precision
from moe_lm.parallel.mesh import build_mesh
from moe_lm.parallel.parallelize import build_backend
from moe_lm.plan.arithmetic import checkpoint_sizes, data_parallel_extras
from moe_lm.plan.fake import Counts, RehearsalMode, fake_world
from moe_lm.plan.gpus import GPU
from moe_lm.plan.routing import AssumedRouting
from moe_lm.train.evaluation import evaluate
from moe_lm.train.optim import apply_freeze, lr_lambda, optimizer_factory, param_groups
from moe_lm.train.step import forward, train_step

REHEARSED_MICRO_BATCHES = 2
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
_TRACKER = {  # MemTracker's categories -> the report's
    "Parameter": "parameters",
    "Buffer": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "temporaries",
}


class StandInAccelerator:
    """What the backends ask accelerate for, without binding the process to a device."""

    def __init__(self, precision: str, world_size: int, local_main: bool, autocast: bool) -> None:
        self.device = torch.device("cpu")  # fake CPU tensors stand for the GPU's (moe_lm/plan/fake.py)
        self.num_processes = world_size
        self.is_local_main_process = local_main
        self.scaler = None
        self._dtype = _DTYPES[precision] if autocast else torch.float32

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


class ZeroBlocks:
    """Validation blocks for the evaluation pass: token id 0 everywhere (only shapes matter)."""

    def __init__(self, count: int, block_len: int) -> None:
        self.count, self.block_len = count, block_len

    def __len__(self) -> int:
        return self.count

    def read(self, idx: np.ndarray) -> np.ndarray:
        return np.zeros((len(idx), self.block_len), dtype=np.int64)


@dataclass
class _Run:
    """What `evaluate` asks a trainer for."""

    cfg: Config
    backend: Backend
    data: Any
    step: int = 0
    tokens: int = 0

    def forward(self, model: Any, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> Any:
        return forward(self.cfg, self.backend.device, 0, model, input_ids, labels, **kwargs)


@dataclass
class Rehearsal:
    """What one rehearsal measured on the rehearsed rank (rank 0: it holds the hottest expert)."""

    world_size: int
    memory: dict[str, int]  # peak device bytes by category (CATEGORIES), measured + arithmetic
    measured_peak: int  # the memory tracker's peak (fake tensors the step allocated)
    flops: int  # per optimizer step, counted (recomputation included)
    roofline_seconds: float  # per step: sum over ops of max(FLOPs / peak, bytes / HBM bandwidth)
    backward_seconds: float  # the part of it that gradient reduction can overlap with
    traffic: dict[str, int]  # bytes this rank sends per step, by collective kind
    checkpoint_bytes: int  # files this rank writes per checkpoint
    host_bytes_at_save: int  # host memory the checkpoint writer holds at once
    experts_impl: str  # the experts' path the step took
    attention: str  # the attention kernel it ran
    host_reads: dict[str, int]  # outside the routing seam: file:line -> reads per step
    seam_reads: int  # routing-count reads per micro-batch
    arithmetic: list[str] = field(default_factory=list)  # which parts are arithmetic, not rehearsed

    @property
    def peak(self) -> int:
        return sum(self.memory.values())


def _gpu_experts_impl(cfg: Config, dtype: torch.dtype) -> str:
    """The experts' path `impl: auto` takes on a GPU: the code's own check, asked about a fake CUDA
    tensor under CUDA autocast in the run's dtype."""
    m = cfg.model
    if m.experts_impl != "auto":
        return m.experts_impl
    probe = Experts(1, m.hidden_size, m.expert_intermediate_size, "auto")
    with FakeTensorMode():
        x = torch.empty(1, m.hidden_size, device="cuda")  # fp32, as the residual stream under autocast
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", dtype != torch.float32)
    torch.set_autocast_dtype("cuda", dtype if dtype != torch.float32 else torch.bfloat16)
    try:
        return "grouped_mm" if probe.uses_grouped_mm(x) else "loop"
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])


@contextlib.contextmanager
def _phases(backend: Backend, mode: RehearsalMode) -> Iterator[dict[str, Counts]]:
    """Counts split into the micro-batches (forward/backward) and the backend's step."""
    phases: dict[str, Counts] = {}
    step = backend.step

    @functools.wraps(step)
    def counted_step(max_grad_norm: float) -> tuple[float, bool]:
        with mode.counting() as counts:
            phases["step"] = counts
            return step(max_grad_norm)

    backend.step = counted_step  # type: ignore[method-assign]
    try:
        with mode.counting() as counts:
            phases["micro"] = counts
            yield phases
    finally:
        backend.step = step  # type: ignore[method-assign]


def rehearse(
    cfg: Config, world_size: int, gpu: GPU, routing: AssumedRouting, gpus_per_node: int
) -> Rehearsal:
    """Rank 0 of `world_size` running `cfg` (its layout included) for two optimizer steps, an
    evaluation pass, two sampled tokens and a checkpoint read-out, on fake tensors."""
    precision = resolve_precision(cfg.train.mixed_precision, "cuda")
    deepspeed = cfg.parallel.backend == "deepspeed"
    dtype = _DTYPES[precision]
    accum = cfg.train.grad_accum_steps
    rehearsed = min(accum, REHEARSED_MICRO_BATCHES)
    impl = _gpu_experts_impl(cfg, dtype)
    # DeepSpeed's engine runs the model in its own dtype (no autocast); the rest is arithmetic.
    run_cfg = cfg.replace(
        model=dataclasses.replace(cfg.model, experts_impl=impl),
        train=dataclasses.replace(cfg.train, grad_accum_steps=rehearsed, compile=False),
        parallel=dataclasses.replace(cfg.parallel, backend="ddp", zero_stage=0),
    )
    mode = RehearsalMode(gpu.peak_flops, gpu.hbm, dtype != torch.float32)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    meta_model = build_meta_model(run_cfg.model)  # outside the fake mode: to_empty swaps its parameters
    with fake_world(world_size, 0), FakeTensorMode(allow_non_fake_inputs=True), mode:
        mesh = build_mesh(cfg.parallel.ep_size, cfg.model.num_experts)
        accelerator = StandInAccelerator(precision, world_size, True, autocast=not deepspeed)
        layout = Layout(accelerator=accelerator, mesh=mesh)
        model = meta_model.to_empty(device="cpu")
        if deepspeed and dtype != torch.float32:
            model = model.to(dtype)
        apply_freeze(model, cfg.train.freeze)
        groups = param_groups(model, cfg.optim.weight_decay)
        backend = build_backend(
            run_cfg, layout, model, groups, optimizer_factory(cfg.optim), lr_lambda(cfg.optim, cfg.train)
        )
        tracker.track_external(backend.raw_model, backend.optimizer)
        root = backend.raw_model

        def new_iteration(module: torch.nn.Module, args: Any) -> None:
            # The tracker keeps per-module statistics of one call of the top module; the step,
            # evaluation and sampling call it many times (its memory peak is kept across them).
            if module is root:
                tracker.reset_mod_stats()

        hook = torch.nn.modules.module.register_module_forward_pre_hook(new_iteration)
        seq = cfg.data.seq_len
        batch = (torch.zeros(cfg.train.micro_batch_size, seq, dtype=torch.long),) * 2
        reader = routing.reader(mesh.ep_size, mesh.ep_rank)
        with assumed_splits(reader), tracker:
            if deepspeed:
                backend.step = functools.partial(_zero_step, backend)  # type: ignore[method-assign]
            for step in (1, 2):
                with _phases(backend, mode) as phases:
                    reads = reader.calls
                    train_step(backend, run_cfg, [batch] * rehearsed, 0, step)
                    seam_reads = (reader.calls - reads) // rehearsed
            run = _Run(run_cfg, backend, _ValData(seq, world_size, cfg.train.micro_batch_size))
            evaluate(run)  # type: ignore[arg-type]
            with backend.autocast():  # as evaluation.sample runs it
                backend.raw_model.generate(torch.zeros(1, 8, dtype=torch.long), 2, temperature=0.8, top_k=50)
            ckpt_bytes, host_bytes = checkpoint_sizes(backend, deepspeed)
        hook.remove()
        peak_snapshot = tracker.get_tracker_snapshot("peak")
    measured = Counter[str]()
    for snap in peak_snapshot.values():
        for key, value in snap.items():
            if key in _TRACKER:
                measured[_TRACKER[key]] += value
    memory = {c: measured[c] for c in CATEGORIES}
    micro, stepped = phases["micro"], phases["step"]
    scale = accum / rehearsed
    traffic = Counter({k: int(v * scale) for k, v in micro.collective_bytes.items()})
    traffic.update(stepped.collective_bytes)
    extras = data_parallel_extras(cfg, backend, world_size, gpus_per_node)
    for category, extra in extras.memory.items():
        memory[category] = max(memory[category] + extra, 0)
    traffic.update(extras.traffic)
    return Rehearsal(
        world_size=world_size,
        memory=memory,
        measured_peak=sum(measured[c] for c in CATEGORIES),
        flops=int(micro.flops * scale + stepped.flops),
        roofline_seconds=micro.roofline_seconds * scale + stepped.roofline_seconds,
        backward_seconds=micro.roofline_seconds * scale * 2 / 3,
        traffic=dict(traffic),
        checkpoint_bytes=ckpt_bytes,
        host_bytes_at_save=host_bytes,
        experts_impl="grouped_mm" if micro.grouped_mm_calls else "loop",
        attention=", ".join(sorted(micro.attention_kernels)) or "none",
        host_reads={k: v for k, v in stepped.host_reads.items()} | dict(micro.host_reads),
        seam_reads=seam_reads,
        arithmetic=extras.notes,
    )


class _ValData:
    def __init__(self, seq_len: int, world_size: int, micro_batch_size: int) -> None:
        # one validation micro-batch per rank
        self.val = {"val": ZeroBlocks(micro_batch_size * world_size, seq_len + 1)}


def _zero_step(backend: Backend, max_grad_norm: float) -> tuple[float, bool]:
    """DeepSpeed's step as far as it runs on fake tensors: the expert-aware global norm and its
    collectives; the partitioned update itself is arithmetic (moe_lm/plan/arithmetic.py)."""
    named = [(n, p) for n, p in backend.raw_model.named_parameters() if p.grad is not None]
    norm = backend.global_grad_norm(named)
    backend.optimizer.zero_grad(set_to_none=True)
    return float(norm), bool(torch.isfinite(norm))
