"""Writes tests/data/ckpt-376ac16/: a 2-process EP=2 checkpoint made by moe_lm at commit 376ac16,
before the on-disk format moved to moe_lm/state, and `expected.pt`, the tensors it held in memory.
tests/unit/test_old_checkpoint.py loads it with today's code.

Run once, against that commit (its API, not today's):
    git worktree add /tmp/old 376ac16
    cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/tests/data/make_old_checkpoint.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from moe_lm.config import Config, DataConfig, ParallelConfig, TrainConfig
from moe_lm.model import MoETransformer
from moe_lm.parallel.backend import Backend
from moe_lm.train.checkpoint import save_checkpoint
from moe_lm.train.optim import lr_lambda, optimizer_factory, param_groups
from tests.conftest import tiny_model_config
from tests.dist.harness import run_workers

SHAPE = dict(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
             max_seq_len=16, num_experts=4, top_k=2, aux_free_bias=True)  # fmt: skip


def make_cfg(out: str) -> Config:
    return Config(
        name="old-ckpt",
        model=tiny_model_config(**SHAPE),
        data=DataConfig(seq_len=8),
        train=TrainConfig(output_dir=out, micro_batch_size=2, max_steps=10, mixed_precision="no"),
        parallel=ParallelConfig(ep_size=2),
    )


def worker(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    cfg = make_cfg(args["out"])
    backend = Backend(cfg)
    torch.manual_seed(cfg.train.seed)
    model = MoETransformer(cfg.model)
    backend.parallelize(model)
    backend.prepare(
        model, param_groups(model, 0.1), optimizer_factory(cfg.optim), lr_lambda(cfg.optim, cfg.train)
    )
    for step in range(2):
        ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(10 * step + rank))
        out = backend.model(ids[:, :-1], ids[:, 1:])
        backend.backward(out.loss)
        backend.step(1.0)
        model.update_expert_bias(backend.all_reduce(out.expert_counts_LE.float(), "sum"))
    trainer_state = {"step": 2, "tokens": 64, "world_size": 2, "last_metrics": {}, "val_loss": None}
    save_checkpoint(cfg, backend, 2, {"loader": {"epoch": 0, "position": 4}, "world_size": 2}, trainer_state)
    return {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "optim": {
            k: {n: t.clone() for n, t in s.items()} for k, s in backend._optimizer_state_by_name().items()
        },
        "lr": [g["lr"] for g in backend.optimizer.param_groups],
        "expert_range": backend.expert_range,
    }


def gather(runs: list[dict[str, Any]]) -> dict[str, Any]:
    expert = lambda n: ".ffn.experts." in n  # noqa: E731
    weights = {
        n: torch.cat([r["weights"][n] for r in runs]) if expert(n) else t
        for n, t in runs[0]["weights"].items()
    }
    optim = {
        n: {
            k: torch.cat([r["optim"][n][k] for r in runs]) if expert(n) and t.dim() else t
            for k, t in s.items()
        }
        for n, s in runs[0]["optim"].items()
    }
    return {"weights": weights, "optim": optim, "lr": runs[0]["lr"]}


if __name__ == "__main__":
    out = Path(sys.argv[1]).resolve()
    runs = run_workers("make_old_checkpoint:worker", 2, {"out": str(out)})
    torch.save(gather(runs), out / "expected.pt")
