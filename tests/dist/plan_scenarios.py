"""Real CPU runs of the sequence a rehearsal runs (moe_lm/plan/rehearsal.py): a first optimizer step of
one micro-batch, then a second of grad_accum_steps, through the trainer's own step function.

What each rank reports: the peak of live bytes in torch's CPU allocator over the whole run (model
built inside the window), read from torch.profiler's allocation events; the bytes handed to
`all_to_all_single` during the second step; and every answer the routing counts' seam gave (the
device's own values), so a rehearsal can replay exactly this routing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from moe_lm.config import load_config
from moe_lm.model import MoETransformer
from moe_lm.model.split_sizes import Over, assumed_splits
from moe_lm.parallel.layout import start_processes
from moe_lm.parallel.parallelize import build_backend
from moe_lm.train.optim import lr_lambda, optimizer_factory, param_groups
from moe_lm.train.step import train_step


def allocator_peak(prof: Any) -> int:
    """The highest sum of live CPU allocations over the profiled window, event by event."""
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _run(config: str, overrides: list[str], rank: int) -> dict[str, Any]:
    cfg = load_config(config, overrides)
    answers: list[list[int]] = []
    moved = [0]
    counting = [False]

    def reader(counts: torch.Tensor, rows: int, over: Over) -> list[int]:
        values: list[int] = counts.tolist()
        answers.append(values)
        return values

    real_all_to_all = dist.all_to_all_single

    def all_to_all_single(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if counting[0]:
            moved[0] += input.numel() * input.element_size()
        return real_all_to_all(output, input, *args, **kwargs)

    dist.all_to_all_single = all_to_all_single  # type: ignore[assignment]
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            layout = start_processes(cfg)
            torch.manual_seed(cfg.train.seed)
            model = MoETransformer(cfg.model)
            backend = build_backend(
                cfg, layout, model, param_groups(model, cfg.optim.weight_decay),
                optimizer_factory(cfg.optim), lr_lambda(cfg.optim, cfg.train),
            )  # fmt: skip
            gen = torch.Generator().manual_seed(1000 + rank)
            shape = (cfg.train.micro_batch_size, cfg.data.seq_len + 1)

            def batch() -> tuple[torch.Tensor, torch.Tensor]:
                ids = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
                return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

            with assumed_splits(reader):
                train_step(backend, cfg, [batch()], 0, 1)
                counting[0] = True
                train_step(backend, cfg, [batch() for _ in range(cfg.train.grad_accum_steps)], 0, 2)
                counting[0] = False
    finally:
        dist.all_to_all_single = real_all_to_all  # type: ignore[assignment]
    return {"peak": allocator_peak(prof), "all_to_all_bytes": moved[0], "answers": answers}


def measured_runs(rank: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """`_run` for each (config, overrides) in args["runs"], one after the other (one process only:
    a process group is joined once)."""
    return [_run(config, overrides, rank) for config, overrides in args["runs"]]
