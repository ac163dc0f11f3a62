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
- accelerate's `Accelerator` (stand_in.py): accelerate binds a process to a real device.
- DDP's gradient all-reduce and buckets, DeepSpeed ZeRO-1/2's partitioned state: neither can be
  built over fake tensors; arithmetic on the parameters they would hold (arithmetic.py).
- The routing counts: from `AssumedRouting` through their seam (moe_lm/model/split_sizes.py).
- Depth: a stack of identical blocks costs the same per block, so every number (memory by category
  at each phase's peak, FLOPs, traffic, checkpoint bytes) is affine in the number of blocks. A deep
  model is rehearsed with 1 and 2 repeats of its block pattern and the rest extrapolated; the tests
  check the extrapolation equals a full-depth rehearsal.
- Micro-batches: the first optimizer step runs one (it creates the optimizer state), the second
  min(grad_accum_steps, 2); the others cost what the second did, so FLOPs and traffic are scaled
  (peak memory does not depend on them: gradients accumulate in place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_lm.config import Config, ModelConfig
from moe_lm.model.experts import Experts
from moe_lm.model.params import build_meta_model
from moe_lm.model.split_sizes import assumed_splits
from moe_lm.parallel.backend import Backend
from moe_lm.parallel.layout import Layout, resolve_precision
from moe_lm.parallel.mesh import build_mesh
from moe_lm.parallel.parallelize import build_backend
from moe_lm.plan.arithmetic import Extras, checkpoint_sizes, data_parallel_extras
from moe_lm.plan.fake import Counts, RehearsalMode, fake_world
from moe_lm.plan.gpus import GPU
from moe_lm.plan.routing import AssumedRouting
from moe_lm.plan.stand_in import DTYPES, PeakTracker, Run, StandInAccelerator, ValidationData
from moe_lm.train.evaluation import evaluate
from moe_lm.train.optim import apply_freeze, lr_lambda, optimizer_factory, param_groups
from moe_lm.train.step import train_step

REHEARSED_MICRO_BATCHES = 2
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
PHASES = ("forward/backward", "optimizer step", "evaluation", "sampling")
_TRACKER = {  # MemTracker's categories -> the report's
    "Parameter": "parameters",
    "Buffer": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "temporaries",
}


@dataclass
class Measurement:
    """What one rehearsal at one depth measured; every number is affine in the depth."""

    memory: dict[str, dict[str, int]]  # phase -> category -> bytes at that phase's peak
    micro: Counts  # the second step's micro-batches
    step: Counts  # the second step's backend.step
    checkpoint_bytes: int
    host_bytes_at_save: int
    seam_reads: int  # routing-count reads per micro-batch


@dataclass
class Rehearsal:
    """What a rehearsal of rank 0 (it holds the hottest expert) found for the whole model."""

    world_size: int
    memory: dict[str, int]  # category -> bytes at the peak phase, measured + arithmetic
    peak_phase: str
    phase_peaks: dict[str, int]  # phase (PHASES) -> its peak bytes, measured + arithmetic
    flops: int  # per optimizer step, counted (recomputation included)
    roofline_seconds: float  # per step: sum over ops of max(FLOPs / peak, bytes / HBM bandwidth)
    backward_seconds: float  # the part of it that a gradient all-reduce can overlap with
    traffic: dict[str, int]  # bytes this rank hands each collective kind per step
    all_to_all_received: int  # bytes the all-to-alls bring to this rank per step
    overlapped: dict[str, int]  # of `traffic`, what runs during the backward (DDP, ZeRO's reduction)
    zero_partition: int  # elements of this rank's ZeRO partitions (0 under DDP)
    checkpoint_bytes: int  # files this rank writes per checkpoint
    host_bytes_at_save: int  # host memory the checkpoint writer holds at once
    experts_impl: str  # the experts' path the step took
    attention: str  # the attention kernel it ran
    host_reads: dict[
        str, int
    ]  # reads of device values in a step outside the routing seam: file:line -> count
    seam_reads: int  # routing-count reads per micro-batch
    depths: tuple[int, ...]  # layers rehearsed (extrapolated to the model's when two)
    arithmetic: list[str] = field(default_factory=list)  # which parts are arithmetic, not rehearsed

    @property
    def peak(self) -> int:
        return sum(self.memory.values())


def gpu_experts_impl(model: ModelConfig, dtype: torch.dtype) -> str:
    """The experts' path `impl: auto` takes on a GPU: the code's own check, asked about a fake CUDA
    tensor under CUDA autocast in the run's dtype."""
    if model.experts_impl != "auto":
        return model.experts_impl
    probe = Experts(1, model.hidden_size, model.expert_intermediate_size, "auto")
    with FakeTensorMode():
        x = torch.empty(1, model.hidden_size, device="cuda")  # fp32, as the residual stream under autocast
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", dtype != torch.float32)
    torch.set_autocast_dtype("cuda", dtype if dtype != torch.float32 else torch.bfloat16)
    try:
        return "grouped_mm" if probe.uses_grouped_mm(x) else "loop"
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])


def depths(model: ModelConfig) -> tuple[int, ...]:
    """Layers to rehearse: the model's own, or 1 and 2 repeats of its block pattern (after the
    first_dense_layers) when the layers beyond repeat it exactly and that is cheaper."""
    period, prefix = model.moe_layer_freq, model.first_dense_layers
    body = model.num_layers - prefix
    if body % period or body // period < 4 or prefix + 3 * period >= model.num_layers:
        return (model.num_layers,)
    return (prefix + period, prefix + 2 * period)


def _measure(
    cfg: Config, mode: RehearsalMode, routing: AssumedRouting, deepspeed: bool, device_type: str
) -> Measurement:
    """Rank 0 for two optimizer steps, an evaluation pass, one sampled token and the checkpoint
    read-out. Inside a fake world and `mode`, outside a FakeTensorMode."""
    precision = resolve_precision(cfg.train.mixed_precision, device_type)
    dtype = DTYPES[precision]
    world_size = torch.distributed.get_world_size()
    meta = build_meta_model(cfg.model)  # outside the fake mode: to_empty swaps its parameters
    if deepspeed and dtype != torch.float32:
        meta = meta.to(dtype)  # the engine holds the module in its dtype, without autocast
    tracker = PeakTracker()
    memory: dict[str, dict[str, int]] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        mesh = build_mesh(cfg.parallel.ep_size, cfg.model.num_experts)
        accelerator = StandInAccelerator(precision, world_size, True, autocast=not deepspeed)
        model = meta.to_empty(device="cpu")
        apply_freeze(model, cfg.train.freeze)
        backend = build_backend(
            cfg, Layout(accelerator=accelerator, mesh=mesh), model,
            param_groups(model, cfg.optim.weight_decay), optimizer_factory(cfg.optim), lr_lambda(cfg.optim, cfg.train),
        )  # fmt: skip
        if deepspeed:
            backend.step = functools.partial(_zero_step, backend)  # type: ignore[method-assign]
        tracker.track_external(backend.raw_model, backend.optimizer)
        hook = torch.nn.modules.module.register_module_forward_pre_hook(_new_call(tracker, backend.raw_model))
        batch = (torch.zeros(cfg.train.micro_batch_size, cfg.data.seq_len, dtype=torch.long),) * 2
        reader = routing.reader(mesh.ep_size, mesh.ep_rank)
        try:
            with assumed_splits(reader), tracker:
                train_step(backend, cfg, [batch], 0, 1)  # creates the optimizer state
                tracker.take_peak()
                counted = _CountedStep(backend, mode, tracker)
                with mode.counting() as micro:
                    train_step(backend, cfg, [batch] * cfg.train.grad_accum_steps, 0, 2)
                memory["optimizer step"] = tracker.take_peak()
                memory["forward/backward"] = counted.before
                counted.restore()
                seam_reads = reader.calls
                val = ValidationData(cfg.data.seq_len, world_size, cfg.train.micro_batch_size)
                evaluate(Run(cfg, backend, val))  # type: ignore[arg-type]
                memory["evaluation"] = tracker.take_peak()
                with backend.autocast():  # as evaluation.sample runs it
                    backend.raw_model.generate(
                        torch.zeros(1, 8, dtype=torch.long), 1, temperature=0.8, top_k=50
                    )
                memory["sampling"] = tracker.take_peak()
                ckpt_bytes, host_bytes = checkpoint_sizes(backend, deepspeed)
        finally:
            hook.remove()
    return Measurement(
        memory={phase: _categories(snap) for phase, snap in memory.items()},
        micro=micro,
        step=counted.counts,
        checkpoint_bytes=ckpt_bytes,
        host_bytes_at_save=host_bytes,
        seam_reads=seam_reads // (1 + cfg.train.grad_accum_steps) if seam_reads else 0,
    )


def _new_call(tracker: PeakTracker, root: torch.nn.Module) -> Any:
    def hook(module: torch.nn.Module, args: Any) -> None:
        # The tracker keeps per-module statistics of one call of the top module; the step,
        # evaluation and sampling call it many times (the device peak is kept across them).
        if module is root:
            tracker.reset_mod_stats()

    return hook


class _CountedStep:
    """Wraps `backend.step` so that it is counted apart from the micro-batches, and takes the
    micro-batches' memory peak as it starts."""

    def __init__(self, backend: Backend, mode: RehearsalMode, tracker: PeakTracker) -> None:
        self.backend, self.original = backend, backend.step
        self.counts = Counts()
        self.before: dict[str, int] = {}

        @functools.wraps(self.original)
        def step(max_grad_norm: float) -> tuple[float, bool]:
            self.before = tracker.take_peak()
            with mode.counting() as counts:
                self.counts = counts
                return self.original(max_grad_norm)

        backend.step = step  # type: ignore[method-assign]

    def restore(self) -> None:
        self.backend.step = self.original  # type: ignore[method-assign]


def _categories(snapshot: dict[str, int]) -> dict[str, int]:
    out = dict.fromkeys(CATEGORIES, 0)
    for key, value in snapshot.items():
        if key in _TRACKER:
            out[_TRACKER[key]] += value
    return out


def _zero_step(backend: Backend, max_grad_norm: float) -> tuple[float, bool]:
    """DeepSpeed's step as far as it runs on fake tensors: the expert-aware global norm and its
    collectives; the partitioned update itself is arithmetic (arithmetic.py)."""
    named = [(n, p) for n, p in backend.raw_model.named_parameters() if p.grad is not None]
    backend.global_grad_norm(named)
    backend.optimizer.zero_grad(set_to_none=True)
    return 0.0, True  # the engine's own reads of the norm are not rehearsed


def _affine(a: Any, b: Any, units: float) -> Any:
    """The value at `units` repeats of the block pattern, from the values at 1 and 2 repeats."""
    if isinstance(a, dict):
        return {k: _affine(a.get(k, 0), b.get(k, 0), units) for k in {*a, *b}}
    return a + (b - a) * (units - 1)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Fake tensors exist only on the thread whose mode made them, so the CPU experts' side-by-side
    slices (model/expert_threads.py, one per torch thread) cannot run in a rehearsal: one slice.
    The plan of a CPU run with several threads leaves out each extra slice's output buffer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def rehearse(
    cfg: Config, world_size: int, gpu: GPU, routing: AssumedRouting, full_depth: bool = False
) -> Rehearsal:
    """Rank 0 of `world_size` ranks running `cfg` (its layout included), on fake tensors.
    `full_depth`: every layer, no extrapolation (the tests compare the two)."""
    on_gpu = gpu.device_type == "cuda"
    precision = resolve_precision(cfg.train.mixed_precision, gpu.device_type)
    dtype = DTYPES[precision]
    deepspeed = cfg.parallel.backend == "deepspeed"
    accum = cfg.train.grad_accum_steps
    micro_batches = min(accum, REHEARSED_MICRO_BATCHES)
    # DeepSpeed's engine runs the model in its own dtype with our step; its update is arithmetic.
    impl: Any = gpu_experts_impl(cfg.model, dtype) if on_gpu else cfg.model.experts_impl
    run_cfg = cfg.replace(
        model=dataclasses.replace(cfg.model, experts_impl=impl),
        train=dataclasses.replace(cfg.train, grad_accum_steps=micro_batches, compile=False),
        parallel=dataclasses.replace(cfg.parallel, backend="ddp", zero_stage=0),
    )
    layers = (cfg.model.num_layers,) if full_depth else depths(cfg.model)
    mode = RehearsalMode(gpu.peak_flops, gpu.hbm, dtype != torch.float32, gpu_attention=on_gpu)
    with fake_world(world_size, 0), mode, _one_thread():
        found = [
            _measure(
                run_cfg.replace(model=dataclasses.replace(run_cfg.model, num_layers=n)), mode, routing, deepspeed, gpu.device_type
            )
            for n in layers
        ]  # fmt: skip
        extras = data_parallel_extras(cfg, world_size)
    units = 1.0 if len(found) == 1 else (cfg.model.num_layers - layers[0]) / (layers[1] - layers[0]) + 1
    first, last = found[0], found[-1]

    def whole(get: Any) -> Any:
        return get(first) if len(found) == 1 else _affine(get(first), get(last), units)

    phases = whole(lambda m: m.memory)
    if deepspeed and cfg.parallel.zero_stage >= 2:  # ZeRO-2 never holds every bf16 gradient
        for snap in phases.values():
            snap["gradients"] = 0
    added = sum(extras.memory.values())
    phase_peaks = {p: int(sum(phases[p].values()) + added) for p in PHASES}
    phase = max(PHASES, key=lambda p: phase_peaks[p])
    memory = {c: int(phases[phase][c] + extras.memory.get(c, 0)) for c in CATEGORIES}
    scale = accum / micro_batches
    traffic = Counter({k: int(v * scale) for k, v in whole(lambda m: dict(m.micro.collective_bytes)).items()})
    traffic.update({k: int(v) for k, v in whole(lambda m: dict(m.step.collective_bytes)).items()})
    traffic.update(extras.traffic)
    micro_roofline = whole(lambda m: m.micro.roofline_seconds) * scale
    return Rehearsal(
        world_size=world_size,
        memory=memory,
        peak_phase=phase,
        phase_peaks=phase_peaks,
        flops=int(whole(lambda m: m.micro.flops) * scale + whole(lambda m: m.step.flops)),
        roofline_seconds=micro_roofline + whole(lambda m: m.step.roofline_seconds),
        backward_seconds=micro_roofline * 2 / 3,  # backward: two of the three GEMMs of each weight
        traffic={k: v for k, v in traffic.items() if v},
        all_to_all_received=int(whole(lambda m: m.micro.all_to_all_received) * scale),
        overlapped=dict(extras.overlapped),
        zero_partition=extras.zero_partition,
        checkpoint_bytes=int(whole(lambda m: m.checkpoint_bytes)),
        host_bytes_at_save=int(whole(lambda m: m.host_bytes_at_save)),
        experts_impl=_experts_path(first),
        attention=_attention_name(first),
        host_reads=dict(first.micro.host_reads + first.step.host_reads),
        seam_reads=int(whole(lambda m: m.seam_reads)),
        depths=layers,
        arithmetic=_notes(extras, layers, cfg, micro_batches),
    )


def _attention_name(m: Measurement) -> str:
    names = {"flash": "flash attention", "efficient": "memory-efficient attention", "math": "math attention"}
    found = {v for k, v in names.items() for op in m.micro.attention_kernels if k in op}
    return ", ".join(sorted(found)) or "none"


def _experts_path(m: Measurement) -> str:
    return "grouped_mm" if m.micro.grouped_mm_calls else "loop"


def _notes(extras: Extras, layers: tuple[int, ...], cfg: Config, micro_batches: int) -> list[str]:
    notes = list(extras.notes)
    if len(layers) == 2:
        notes.append(
            f"depth: rehearsed with {layers[0]} and {layers[1]} layers, extrapolated to {cfg.model.num_layers}"
        )
    if micro_batches < cfg.train.grad_accum_steps:
        notes.append(
            f"micro-batches: {micro_batches} of {cfg.train.grad_accum_steps} rehearsed, FLOPs and traffic scaled"
        )
    return notes
