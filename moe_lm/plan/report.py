"""A plan as text (a table of layouts, then the recommended one in detail) or as one JSON object."""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_lm.model.params import count_params, flops_per_token
from moe_lm.plan.gpus import GIB
from moe_lm.plan.planner import USABLE, Candidate, Plan
from moe_lm.plan.rehearsal import CATEGORIES
from moe_lm.plan.roofline import ASSUMPTIONS


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f}"


def _flops(n: int | float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:,.0f} FLOP"


def _table(plan: Plan) -> list[str]:
    best = plan.recommended
    head = (
        f"  {'layout':<24}{'peak GiB':>9}{'fits':>6}{'headroom':>10}{'step s':>8}{'tokens/s':>11}{'MFU':>7}"
    )
    lines = [head]
    for c in plan.candidates:
        mark = "  <- recommended" if c is best else ""
        lines.append(
            f"  {c.layout.name:<24}{_gib(c.rehearsal.peak):>9}{'yes' if c.fits else 'no':>6}"
            f"{_gib(c.headroom):>10}{c.time.seconds:>8.2f}{c.time.tokens_per_s:>11,.0f}{c.time.mfu:>7.1%}{mark}"
        )
    return lines


def _detail(plan: Plan, c: Candidate) -> list[str]:
    r, t, cfg = c.rehearsal, c.time, c.layout.apply(plan.job.cfg)
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len
    model_flops = flops_per_token(
        cfg.model, cfg.data.seq_len, count_params(cfg.model).active_params
    ).train_total
    parts = ", ".join(f"{k} {_gib(r.memory[k])}" for k in CATEGORIES)
    traffic = ", ".join(f"{k} {_gib(v)}" for k, v in sorted(r.traffic.items())) or "none"
    reads = ", ".join(f"{site} ({n})" for site, n in sorted(r.host_reads.items())) or "none"
    if cfg.parallel.backend == "deepspeed":
        reads = "DeepSpeed's engine step is not rehearsed"
    return [
        f"{c.layout.name} on rank 0 (it holds the hottest expert), per optimizer step:",
        f"  peak memory {_gib(r.peak)} GiB, during the {r.peak_phase}: {parts} (GiB)",
        f"  FLOPs: {_flops(r.flops)} counted (recomputation included); model FLOPs "
        f"{_flops(model_flops * tokens)} (6 x active parameters + attention, {tokens:,} tokens)",
        f"  traffic (GiB handed to each collective): {traffic}",
        f"  step {t.seconds:.2f} s = compute {t.compute:.2f} + all-to-all {t.all_to_all:.2f} + "
        f"exposed gradient reduction {t.exposed_reduction:.2f}",
        f"  checkpoint: {_gib(r.checkpoint_bytes)} GiB written by this rank, host memory at save "
        f"{_gib(r.host_bytes_at_save)} GiB",
        f"  experts: {r.experts_impl}; attention: {r.attention}",
        f"  device reads in the step outside the routing seam: {reads}; routing-count reads per "
        f"micro-batch: {r.seam_reads}",
    ]


def render(plan: Plan, config_path: str, overrides: list[str]) -> str:
    job = plan.job
    nodes = max(1, job.gpus // job.gpus_per_node)
    routing = "balanced" if job.imbalance == 1 else f"hottest expert at {job.imbalance:g}x the mean load"
    lines = [
        f"plan: {config_path} on {job.gpus} x {job.gpu.name} ({nodes} node{'s' * (nodes > 1)} of "
        f"{min(job.gpus, job.gpus_per_node)}), routing {routing}",
        f"gpu: {job.gpu.describe()}; usable {USABLE:.0%} = {_gib(job.usable)} GiB",
        "",
        *_table(plan),
        "",
    ]
    shown = plan.recommended
    if shown is not None:
        command = " ".join(["moe-lm train", config_path, *overrides, *shown.layout.overrides()])
        lines += [f"recommended: {shown.layout.name}, the fastest layout that fits", f"  {command}", ""]
        lines += _detail(plan, shown)
    else:
        shown = plan.closest
        lines += ["no layout fits; the closest:"] + _detail(plan, shown)
    lines += ["", "roofline assumptions:", *(f"  {a}" for a in ASSUMPTIONS)]
    lines += [f"not rehearsed in {shown.layout.name} (arithmetic or extrapolation):"]
    lines += [f"  {n}" for n in shown.rehearsal.arithmetic]
    return "\n".join(lines)


def as_json(plan: Plan) -> dict[str, Any]:
    job = plan.job
    best = plan.recommended
    return {
        "gpus": job.gpus,
        "gpus_per_node": job.gpus_per_node,
        "gpu": dataclasses.asdict(job.gpu),
        "usable_bytes": job.usable,
        "imbalance": job.imbalance,
        "recommended": best.layout.name if best else None,
        "layouts": [
            {
                "layout": c.layout.name,
                "overrides": c.layout.overrides(),
                "fits": c.fits,
                "headroom_bytes": c.headroom,
                "peak_bytes": c.rehearsal.peak,
                **{k: v for k, v in dataclasses.asdict(c.rehearsal).items() if k != "depths"},
                "depths": list(c.rehearsal.depths),
                "step": dataclasses.asdict(c.time),
            }
            for c in plan.candidates
        ],
        "assumptions": ASSUMPTIONS,
    }
