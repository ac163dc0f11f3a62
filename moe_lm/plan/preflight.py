"""The check before step 1 of a GPU run: the plan of the run's own layout against the device.

`moe-lm train` calls `check_gpu_run` on the first process before any process group starts (a
rehearsal plays rank 0 of the launched world in a fake one). One warning line when the rehearsed
peak exceeds 90% of the device's memory, with what to change; the run then goes on (the plan can be
wrong, and the user may know better). CPU runs are checked by the formula in
moe_lm/train/preflight.py instead: there RAM is rarely the limit and a rehearsal would cost every
run a few seconds (docs/plan.md gives the formula's error against the plan).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from moe_lm.config import Config
from moe_lm.plan.gpus import GPU, KNOWN, size
from moe_lm.plan.layouts import of_config
from moe_lm.plan.planner import Job, evaluate_layout

_NAMES = {"H200": "h200-141gb", "H100": "h100-80gb", "A100": "a100-80gb"}


def local_gpu() -> GPU:
    """This machine's GPU 0: its memory; peak and bandwidths of the known kind it names, else an H100's."""
    props = torch.cuda.get_device_properties(0)
    kind = next((v for k, v in _NAMES.items() if k in props.name), "h100-80gb")
    return dataclasses.replace(KNOWN[kind], name=props.name, memory=int(props.total_memory))


def check_with_plan(cfg: Config, world_size: int, gpus_per_node: int, gpu: GPU) -> str | None:
    """Rehearse the run's own layout; print one warning line (and return it) when it does not fit."""
    job = Job(cfg, world_size, gpus_per_node, gpu)
    found = evaluate_layout(job, of_config(cfg))
    if found.fits:
        return None
    r = found.rehearsal
    parts = ", ".join(f"{k} {size(v)}" for k, v in r.memory.items())
    message = (
        f"warning: the plan of this run ({found.layout.name} on {world_size} GPU{'s' * (world_size > 1)}) needs {size(r.peak)} "
        f"per GPU ({parts}) but {gpu.name} gives {size(job.usable)} usable; see "
        f"`moe-lm plan CONFIG --gpus {world_size}` for a layout that fits"
    )
    print(message, file=sys.stderr, flush=True)
    return message


def check_gpu_run(cfg: Config) -> str | None:
    """The check `moe-lm train` runs first on a GPU machine (first process only)."""
    if not torch.cuda.is_available() or os.environ.get("RANK", "0") != "0":
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return check_with_plan(cfg, world, per_node, local_gpu())
