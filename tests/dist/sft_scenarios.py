"""Instruction-tuning runs inside the worker processes of tests/dist (see harness.py): the real
Trainer, from a config dict, start to finish; the test reads the run directories."""

from __future__ import annotations

from typing import Any


def fit(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    from moe_lm.config import config_from_dict
    from moe_lm.train.trainer import Trainer

    trainer = Trainer(config_from_dict(args["cfg"]))
    summary = trainer.fit()
    return {"step": summary["step"], "world_size": trainer.backend.world_size}


def many(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Several runs in one launch, one after the other (process start-up dominates)."""
    return {name: fit(rank, job) for name, job in args.items()}
