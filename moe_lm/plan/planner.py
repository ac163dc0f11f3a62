"""Plan a job: rehearse each candidate layout on the target world, predict its speed, say which fit,
and recommend the fastest that does."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_lm.config import Config
from moe_lm.errors import UserError
from moe_lm.plan.gpus import GPU, size
from moe_lm.plan.layouts import JobLayout, auto_layouts, check_layout, parse_layout
from moe_lm.plan.rehearsal import Rehearsal, rehearse
from moe_lm.plan.roofline import StepTime, predict
from moe_lm.plan.routing import AssumedRouting

USABLE = (
    0.9  # of the device's memory: the CUDA context, NCCL buffers and allocator fragmentation take the rest
)


@dataclass(frozen=True)
class Job:
    cfg: Config
    gpus: int
    gpus_per_node: int
    gpu: GPU
    imbalance: float = 1.0

    @property
    def usable(self) -> int:
        return int(self.gpu.memory * USABLE)

    def check(self) -> None:
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise UserError(f"--gpus {self.gpus} and --gpus-per-node {self.gpus_per_node} must be at least 1")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise UserError(
                f"--gpus {self.gpus} is not a multiple of --gpus-per-node {self.gpus_per_node}: nodes are "
                f"filled whole; use {self.gpus // self.gpus_per_node * self.gpus_per_node} or "
                f"{-(-self.gpus // self.gpus_per_node) * self.gpus_per_node} GPUs, or set --gpus-per-node"
            )


@dataclass
class Candidate:
    layout: JobLayout
    rehearsal: Rehearsal
    time: StepTime
    fits: bool
    headroom: int  # usable bytes minus the peak (negative: over)


@dataclass
class Plan:
    job: Job
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def recommended(self) -> Candidate | None:
        fitting = [c for c in self.candidates if c.fits]
        return max(fitting, key=lambda c: c.time.tokens_per_s) if fitting else None

    @property
    def closest(self) -> Candidate:
        return max(self.candidates, key=lambda c: c.headroom)


def resolve_layouts(spec: str, job: Job) -> list[JobLayout]:
    cfg = job.cfg
    if spec == "auto":
        layouts = auto_layouts(cfg, job.gpus, job.gpus_per_node)
    else:
        layouts = [parse_layout(item, cfg) for item in spec.split(",") if item.strip()]
        if not layouts:
            raise UserError("--layouts is empty; give 'auto', 'config' or layouts such as ep8/zero2/mb1x8/ac")
    for layout in layouts:
        check_layout(layout, cfg, job.gpus)
    return layouts


def evaluate_layout(job: Job, layout: JobLayout) -> Candidate:
    cfg = layout.apply(job.cfg)
    routing = AssumedRouting(cfg.model.num_experts, job.imbalance)
    r = rehearse(cfg, job.gpus, job.gpu, routing)
    headroom = job.usable - r.peak
    return Candidate(layout, r, predict(cfg, r, job.gpu, job.gpus_per_node), headroom >= 0, headroom)


def make_plan(job: Job, layouts: list[JobLayout]) -> Plan:
    job.check()
    return Plan(job, [evaluate_layout(job, layout) for layout in layouts])


def require_fit(plan: Plan) -> Candidate:
    """The recommended candidate, or one line saying what comes closest and by how much it is over."""
    best = plan.recommended
    if best is not None:
        return best
    near = plan.closest
    job = plan.job
    raise UserError(
        f"no layout fits {job.gpus} x {job.gpu.name}: the closest, {near.layout.name}, needs "
        f"{size(near.rehearsal.peak)} per GPU, {size(-near.headroom)} over the "
        f"{size(job.usable)} usable; add GPUs, raise ep_size, use ZeRO-2 (zero2), turn on "
        "activation checkpointing (ac) or lower the micro-batch"
    )
