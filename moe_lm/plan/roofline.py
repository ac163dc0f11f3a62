"""Predicted step time, tokens/s and MFU of a rehearsed layout: a roofline with stated assumptions.

  compute   the rehearsal's per-op roofline: each op takes max(FLOPs / peak, bytes / HBM bandwidth)
            (eager PyTorch: one kernel per op, no fusion), plus, under ZeRO, the partitioned AdamW
            update (it reads and writes 16 B per partition element: master weight, two moments,
            gradient) at HBM bandwidth
  all-to-all   EP tokens: max(bytes sent, bytes received) x (ep-1)/ep over NVLink (the EP group
            inside a node) or the network; on the critical path, not overlapped
  gradient reduction   ring: all-reduce moves 2(n-1)/n of its bytes, reduce-scatter and
            all-gather (n-1)/n, over NVLink when the group fits in a node, else the network; DDP's
            bucketed all-reduce and ZeRO-2's reduction (overlap_comm) overlap the backward (hidden
            up to the backward's time), the rest is exposed
Left out: kernel launch gaps and CPU overhead, collective latency, stragglers, the data loader,
evaluation and checkpoint pauses, and torch.compile (which fuses the elementwise ops away).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lm.config import Config
from moe_lm.model.params import count_params, flops_per_token
from moe_lm.plan.gpus import GPU
from moe_lm.plan.rehearsal import Rehearsal

ASSUMPTIONS = [
    "compute: per op max(FLOPs / peak (fp32 peak for fp32 ops), bytes / HBM bandwidth), one kernel per op (eager, no fusion)",
    "EP all-to-all: on the critical path, max(sent, received) x (ep-1)/ep over NVLink inside a node",
    "gradient reduction: ring collectives; DDP's and ZeRO-2's overlap the backward, the rest is exposed",
    "left out: launch gaps, CPU overhead, collective latency, stragglers, data loading, eval/checkpoint pauses",
]


@dataclass(frozen=True)
class StepTime:
    compute: float
    all_to_all: float
    exposed_reduction: float
    seconds: float
    tokens_per_s: float
    mfu: float


def _ring(kind: str, n: int) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n


def predict(cfg: Config, r: Rehearsal, gpu: GPU, gpus_per_node: int) -> StepTime:
    world, ep = r.world_size, cfg.parallel.ep_size
    link = gpu.nvlink if world <= gpus_per_node else gpu.network
    ep_link = gpu.nvlink if gpus_per_node % ep == 0 else gpu.network
    compute = r.roofline_seconds
    compute += 2 * 16 * r.zero_partition / gpu.hbm  # ZeRO's AdamW update, outside the rehearsal
    a2a_bytes = max(r.traffic.get("all_to_all", 0), r.all_to_all_received)
    all_to_all = a2a_bytes * (ep - 1) / ep / ep_link if ep > 1 else 0.0
    overlapped = exposed = 0.0
    for kind, nbytes in r.traffic.items():
        if kind == "all_to_all":
            continue
        hidden = r.overlapped.get(kind, 0)
        overlapped += hidden * _ring(kind, world) / link
        exposed += (nbytes - hidden) * _ring(kind, world) / link
    exposed += max(0.0, overlapped - r.backward_seconds)
    seconds = compute + all_to_all + exposed
    tokens = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len * world
    per_token = flops_per_token(cfg.model, cfg.data.seq_len, count_params(cfg.model).active_params)
    mfu = per_token.train_total * tokens / (seconds * gpu.peak_flops * world)
    return StepTime(compute, all_to_all, exposed, seconds, tokens / seconds, mfu)
