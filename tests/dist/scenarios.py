"""Training runs executed inside the worker processes of tests/dist (see harness.py).

Every run trains the same tiny MoE on the same global batch: shard s of step t is a fixed random
batch. Two processes run one shard each (accum 1); the one-process reference runs both shards as
a gradient-accumulation of 2 (loss / 2), which is what the processes together must equal.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from moe_lm.config import Config, ParallelConfig, TrainConfig
from moe_lm.model import MoETransformer
from moe_lm.parallel.backend import Backend, DDPBackend
from moe_lm.parallel.layout import start_processes
from moe_lm.parallel.parallelize import build_backend
from tests.conftest import tiny_model_config

MICRO, SEQ, SHARDS = 4, 16, 2


def make_cfg(
    ep_size: int = 1, backend: str = "ddp", zero_stage: int = 0, accum: int = 1, **model: Any
) -> Config:
    return Config(
        model=tiny_model_config(**model),
        train=TrainConfig(micro_batch_size=MICRO, grad_accum_steps=accum, mixed_precision="no"),
        parallel=ParallelConfig(backend=backend, ep_size=ep_size, zero_stage=zero_stage),  # type: ignore[arg-type]
    )


def batch(step: int, shard: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + shard)
    ids = torch.randint(0, vocab, (MICRO, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def lr_lambda(step: int) -> float:
    return min(1.0, (step + 1) / 4)  # the lr changes over the first steps, so a resume must restore it


def build(cfg: Config) -> tuple[Backend, MoETransformer]:
    layout = start_processes(cfg)
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    make = lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.95))  # noqa: E731
    return build_backend(cfg, layout, model, groups, make, lr_lambda), model


def my_shards(backend: Backend) -> list[int]:
    return [backend.rank] if backend.world_size == SHARDS else list(range(SHARDS))


def train(
    backend: Backend,
    model: MoETransformer,
    first: int,
    last: int,
    clip: float,
    norms: list[float] | None = None,
) -> list[float]:
    """Steps [first, last); returns the loss of every (step, shard) this rank ran and appends the
    gradient norm each step reported (the one it clipped with) to `norms`."""
    shards, losses = my_shards(backend), []
    for step in range(first, last):
        counts = None
        for i, shard in enumerate(shards):
            ids, labels = batch(step, shard, model.cfg.vocab_size)
            with backend.accumulate(sync=i == len(shards) - 1):
                out = backend.model(ids.to(backend.device), labels.to(backend.device))
                backend.backward(out.loss / len(shards))
            losses.append(float(out.loss.detach()))
            counts = out.expert_counts_LE if counts is None else counts + out.expert_counts_LE
        norm, _ = backend.step(clip)
        if norms is not None:
            norms.append(norm)
        if model.cfg.aux_free_bias and counts is not None:  # as the trainer does: the global load
            model.update_expert_bias(backend.all_reduce(counts.float(), "sum"))
    return losses


def probe(backend: Backend, model: MoETransformer) -> dict[str, Any]:
    """Step-0 forward outputs and the finished gradients, without stepping."""
    shards, logits, losses, dropped = my_shards(backend), [], [], []
    for i, shard in enumerate(shards):
        ids, labels = batch(0, shard, model.cfg.vocab_size)
        with backend.accumulate(sync=i == len(shards) - 1):
            out = backend.model(ids, labels)
            backend.backward(out.loss / len(shards))
        logits.append(out.logits.detach().clone())
        losses.append(float(out.loss.detach()))
        dropped.append(int(out.dropped_L.sum()))
    assert isinstance(backend, DDPBackend)  # DeepSpeed reduces inside its step; no probe there
    norm = float(backend.reduce_gradients())
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    backend.optimizer.zero_grad(set_to_none=True)
    return {"logits": logits, "losses": losses, "dropped": dropped, "grads": grads, "norm": norm}


def snapshot(backend: Backend, model: MoETransformer) -> dict[str, Any]:
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in backend.optimizer.state.items()}
    return {
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optim": optim,
        "expert_range": backend.expert_range,
        "lr": [g["lr"] for g in backend.optimizer.param_groups],
    }


def equivalence(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Probe, then `steps` optimizer steps; optionally save a checkpoint after `save_at` steps."""
    cfg = make_cfg(**args["cfg"])
    backend, model = build(cfg)
    result = probe(backend, model)
    save_at, steps = args.get("save_at"), args["steps"]
    result["norms_run"] = []
    if save_at:
        result["losses_run"] = train(backend, model, 0, save_at, args["clip"], result["norms_run"])
        Path(args["save_dir"]).mkdir(parents=True, exist_ok=True)
        backend.save_state(Path(args["save_dir"]))
        backend.barrier()
        result["saved"] = snapshot(backend, model)
        result["losses_run"] += train(backend, model, save_at, steps, args["clip"], result["norms_run"])
    else:
        result["losses_run"] = train(backend, model, 0, steps, args["clip"], result["norms_run"])
    result.update(snapshot(backend, model))
    return result


def resume(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint written at another EP size, record the state, train on from there."""
    backend, model = build(make_cfg(**args["cfg"]))
    backend.load_state(Path(args["load_dir"]))
    loaded = snapshot(backend, model)
    losses = train(backend, model, args["first"], args["steps"], args["clip"])
    return {"loaded": loaded, "losses_run": losses, **snapshot(backend, model)}


def many(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Several runs in one launch (process start-up dominates the suite's time)."""
    return {name: globals()[job["fn"]](rank, job["args"]) for name, job in args.items()}


def step_time(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Mean seconds per optimizer step on the tiny-shakespeare model shape (global batch
    `batch` × 128 tokens split over the processes), plus the EP load metrics of the last step."""
    shape = dict(vocab_size=2048, hidden_size=128, intermediate_size=256, num_layers=4, max_seq_len=256)
    backend, model = build(make_cfg(ep_size=args["ep_size"], **shape))
    per_rank = args["batch"] // backend.world_size
    ids = torch.randint(0, 2048, (per_rank, 129), generator=torch.Generator().manual_seed(rank))
    times, metrics = [], {}
    for i in range(args["steps"] + 1):
        t0 = time.perf_counter()
        out = backend.model(ids[:, :-1], ids[:, 1:])
        backend.backward(out.loss)
        backend.step(1.0)
        if i:  # the first step pays for allocation
            times.append(time.perf_counter() - t0)
        if i == args["steps"]:
            with torch.no_grad():  # an evaluation pass must not count as training load
                backend.raw_model(ids[:, :-1])
        metrics = backend.extra_metrics()  # collective; counters cover this step only
    return {"step_s": sum(times) / len(times), "metrics": metrics}


def deepspeed_run(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """ZeRO-0/1/2 with EP from scratch, optionally saving a checkpoint after `save_at` steps; then,
    optionally, the same engine loads `load_dir` (written at step `save_at` by another backend and
    EP size) and trains on from there. One DeepSpeed engine per process: accelerate allows one
    DeepSpeed plugin per process."""
    backend, model = build(make_cfg(backend="deepspeed", **args["cfg"]))
    t0 = time.perf_counter()
    norms: list[float] = []
    losses = train(backend, model, 0, args["save_at"], args["clip"], norms)
    saved = None
    if args.get("save_dir"):
        Path(args["save_dir"]).mkdir(parents=True, exist_ok=True)
        backend.save_state(Path(args["save_dir"]))
        backend.barrier()
        saved = _ds_state(backend)
    losses += train(backend, model, args["save_at"], args["steps"], args["clip"], norms)
    seconds = (time.perf_counter() - t0) / args["steps"]
    result = {
        "losses_run": losses,
        "norms_run": norms,
        "expert_range": backend.expert_range,
        "step_s": seconds,
        "saved": saved,
    }
    result.update(_ds_state(backend))
    if args.get("load_dir"):
        backend.load_state(Path(args["load_dir"]))
        loaded = _ds_state(backend)
        losses = train(backend, model, args["save_at"], args["steps"], args["clip"])
        resumed = {"loaded": loaded, "losses_run": losses, "expert_range": backend.expert_range}
        result["resumed"] = {**resumed, **_ds_state(backend)}
    return result


def _ds_state(backend: Backend) -> dict[str, Any]:
    """fp32 master weights and full optimizer state, gathered the way checkpoints gather them."""
    optim = backend.optimizer_state()
    return {
        "weights": {k: v.detach().clone() for k, v in backend.model_state().items()},
        "optim": {n: {k: v.clone() for k, v in s.items()} for n, s in optim.items()},
        "lr": [g["lr"] for g in backend.scheduler.optimizer.param_groups],
    }


def dispatcher_case(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """AllToAllDispatcher alone on hand-picked routing (e.g. nothing reaches one rank's experts):
    outputs and gradients, to compare with LocalDispatcher over all experts in one process."""
    import torch.distributed as dist

    from moe_lm.parallel.expert_parallel import AllToAllDispatcher, EPStats
    from moe_lm.parallel.mesh import build_mesh

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = build_mesh(2, args["experts"])
    experts, x_TH, idx_TK, w_TK = dispatcher_inputs(rank, args)
    start, end = mesh.expert_range(args["experts"])
    with torch.no_grad():
        for p in (experts.gate_up_proj, experts.down_proj):
            p.data = p.data[start:end].clone()
    experts.num_experts = end - start
    assert mesh.ep_group is not None
    dispatch = AllToAllDispatcher(mesh.ep_group, 2, EPStats())
    y_TH, dropped = dispatch(x_TH, idx_TK, w_TK, experts, args["experts"], args.get("capacity"))
    (y_TH * y_TH).sum().backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in experts.named_parameters()}
    return {
        "y": y_TH.detach(),
        "x_grad": x_TH.grad,
        "grads": grads,
        "dropped": int(dropped),
        "received": dispatch.stats.tokens_received,
    }


def dispatcher_inputs(
    rank: int, args: dict[str, Any]
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    from moe_lm.model.experts import Experts

    torch.manual_seed(0)
    experts = Experts(args["experts"], 8, 12, "loop")
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    g = torch.Generator().manual_seed(rank)
    x_TH = torch.randn(args["tokens"][rank], 8, generator=g).requires_grad_()
    idx_TK = torch.tensor(args["routes"][rank], dtype=torch.long).view(-1, 2)
    w_TK = torch.softmax(torch.randn(idx_TK.shape, generator=g), dim=-1)
    return experts, x_TH, idx_TK, w_TK


def trainer_evaluate(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """The real Trainer's validation pass at step 0 (weights from the seed: the same everywhere)."""
    from moe_lm.config import config_from_dict
    from moe_lm.train.evaluation import evaluate
    from moe_lm.train.trainer import Trainer

    trainer = Trainer(config_from_dict(args["cfg"]))
    try:
        return evaluate(trainer)
    finally:
        trainer.log.close()
