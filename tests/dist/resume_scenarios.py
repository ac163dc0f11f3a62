"""Real training runs (the Trainer, as `moe-lm train` drives it) inside the worker processes of
tests/dist (see harness.py), for resuming on another number of processes."""

from __future__ import annotations

from typing import Any


def fit(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Train each config of `args["runs"]` in order (later ones may resume earlier ones); returns
    each run's summary and the error line of a run that stopped with a user error."""
    from moe_lm.config import config_from_dict
    from moe_lm.errors import UserError
    from moe_lm.train.trainer import Trainer

    out: dict[str, Any] = {}
    for name, cfg in args["runs"].items():
        try:
            trainer = Trainer(config_from_dict(cfg))
            summary = trainer.fit()
            out[name] = {"step": summary["step"], "finished": summary["finished"]}
        except UserError as e:
            out[name] = {"error": str(e)}
    return out
