"""Global-batch balancing runs inside the worker processes of tests/dist (see harness.py).

Every step's global batch is SHARDS shards of scenarios.MICRO sequences (shard s of step t is
`scenarios.batch(t, s)`), with two "domains" so that micro-batches route differently. A run splits
it over its processes (consecutive shards per rank) and over `accum` micro-batches per rank;
`whole` runs it as one micro-batch in one process: the reference every split must equal.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moe_lm.model import MoETransformer
from moe_lm.model.balance import global_batch_step
from moe_lm.parallel.backend import Backend, DDPBackend
from tests.dist.scenarios import batch, build, make_cfg, snapshot

SHARDS = 4
# aux_loss_coef 1: the balance loss's gradient is as large as the LM loss's, so a wrong f shows.
MODEL: dict[str, Any] = {"aux_loss_coef": 1.0}


def domain_shard(step: int, s: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shard `s` of step `step`; the second half of the shards is another "domain" (token ids
    from the upper half of the vocabulary), so micro-batches route differently."""
    ids, labels = batch(step, s, vocab)
    half = vocab // 2
    offset = half if s >= SHARDS // 2 else 0
    return ids % half + offset, labels % half + offset


def micro_batches(step: int, rank: int, world: int, accum: int, vocab: int) -> list[Any]:
    """This rank's micro-batches of step `step`: its consecutive shards in `accum` groups."""
    per_rank = SHARDS // world
    mine = [domain_shard(step, s, vocab) for s in range(rank * per_rank, (rank + 1) * per_rank)]
    size = per_rank // accum
    groups = [mine[i * size : (i + 1) * size] for i in range(accum)]
    return [(torch.cat([g[0] for g in group]), torch.cat([g[1] for g in group])) for group in groups]


def run_step(backend: Backend, model: MoETransformer, batches: list[Any]) -> list[float]:
    """Forward and backward of one step's micro-batches, as the trainer runs them."""
    losses = []
    with global_batch_step(model, batches, lambda b: model.route_counts(b[0].to(backend.device))):
        for i, (ids, labels) in enumerate(batches):
            with backend.accumulate(sync=i == len(batches) - 1):
                out = backend.model(ids.to(backend.device), labels.to(backend.device))
                backend.backward(out.loss / len(batches))
            losses.append(float(out.loss.detach()))
    return losses


def global_run(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Step-0 losses and finished gradients (DDP only), then `steps` AdamW steps; seconds per step."""
    cfg = make_cfg(**args["cfg"], **MODEL)
    backend, model = build(cfg)
    world, accum, vocab = backend.world_size, args["accum"], cfg.model.vocab_size
    result: dict[str, Any] = {"expert_range": backend.expert_range}
    if isinstance(backend, DDPBackend):
        result["losses"] = run_step(backend, model, micro_batches(0, rank, world, accum, vocab))
        result["norm"] = float(backend.reduce_gradients())
        result["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        backend.optimizer.zero_grad(set_to_none=True)
    losses_run, t0 = [], time.perf_counter()
    for step in range(args["steps"]):
        losses_run.append(run_step(backend, model, micro_batches(step, rank, world, accum, vocab)))
        backend.step(1.0)
    result["step_s"] = (time.perf_counter() - t0) / args["steps"]
    result["losses_run"] = losses_run
    if isinstance(backend, DDPBackend):
        result.update(snapshot(backend, model))
    else:
        result["weights"] = {k: v.detach().clone() for k, v in backend.model_state().items()}
    return result


def many(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Several runs in one launch (process start-up dominates the suite's time)."""
    return {name: global_run(rank, job) for name, job in args.items()}
