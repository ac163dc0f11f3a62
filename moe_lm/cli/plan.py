"""`moe-lm plan CONFIG [overrides] --gpus N`: size a job before it is queued.

Each candidate layout is rehearsed on fake tensors (moe_lm/plan/rehearsal.py): one process plays
rank 0 of the target world through moe_lm's own model, parallelisation and training step. The
report gives, per layout, peak memory and whether it fits, and a roofline's step time, tokens/s
and MFU; then the fastest layout that fits in detail. Exit 2 when none fits.
"""

from __future__ import annotations

import contextlib
import json
import sys

from moe_lm.config import load_config
from moe_lm.errors import ArgumentParser, UserError


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="moe-lm plan", description="Size a job before it is queued.")
    p.add_argument("config", help="YAML run config, e.g. configs/mixtral-8x7b.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as data.seq_len=2048")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument(
        "--gpu",
        default="h100-80gb",
        help="h100-80gb (default), h200-141gb, a100-80gb, a100-40gb, or "
        "custom:memory_gib=80,tflops=989,fp32_tflops=67,hbm_tbps=3.35,nvlink_gbps=450,network_gbps=50",
    )
    p.add_argument(
        "--layouts",
        default="auto",
        help="auto (the config's layout and ZeRO-2 / DDP variants at the largest EP sizes), config "
        "(the config's only), or a comma-separated list such as ep8/zero2/mb1x8/ac,ep4/ddp/noac",
    )
    p.add_argument(
        "--imbalance",
        type=float,
        default=1.0,
        help="the hottest expert's load over the mean (1: balanced routing, the default)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    return p


def plan_main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    cfg = load_config(args.config, args.overrides)
    from moe_lm.plan.gpus import parse_gpu
    from moe_lm.plan.planner import Job, make_plan, require_fit, resolve_layouts
    from moe_lm.plan.report import as_json, render
    from moe_lm.plan.routing import AssumedRouting

    AssumedRouting(cfg.model.num_experts, args.imbalance)  # refuses an impossible imbalance
    job = Job(cfg, args.gpus, args.gpus_per_node, parse_gpu(args.gpu), args.imbalance)
    job.check()
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the report (one JSON object with --json)
        plan = make_plan(job, resolve_layouts(args.layouts, job))
    if args.json:
        print(json.dumps(as_json(plan)))
    else:
        print(render(plan, args.config, args.overrides))
    sys.stdout.flush()
    try:
        require_fit(plan)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
