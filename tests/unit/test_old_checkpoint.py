"""A checkpoint written by an earlier moe_lm (commit 376ac16: 2 processes, EP=2, DDP, aux-free
bias, 2 AdamW steps; tests/data/make_old_checkpoint.py) still loads to the very tensors that run
held in memory (`expected.pt`): weights, Adam moments, learning rate, loader position."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moe_lm.config import ParallelConfig, load_config
from moe_lm.model import MoETransformer
from moe_lm.model.params import is_expert_param
from moe_lm.parallel.layout import start_processes
from moe_lm.parallel.parallelize import build_backend
from moe_lm.state.checkpoint import load_checkpoint
from moe_lm.state.optimizer import load_optimizer_state
from moe_lm.state.resolve import resolve_checkpoint
from moe_lm.state.weights import load_model_state, load_pretrained
from moe_lm.train.optim import lr_lambda, optimizer_factory, param_groups

RUN = Path(__file__).resolve().parents[1] / "data" / "ckpt-376ac16"


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return torch.load(RUN / "expected.pt", weights_only=False)


def _equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name, x in a.items():
        if isinstance(x, dict):
            _equal(x, b[name])
        else:
            assert x.dtype == b[name].dtype and torch.equal(x, b[name]), name


def test_the_old_run_resolves_and_exports_the_same_weights(expected: dict[str, Any]) -> None:
    ckpt = resolve_checkpoint(RUN)  # the manifest still verifies; `latest` still names it
    assert ckpt == RUN / "checkpoints" / "step-2"
    _, model = load_pretrained(RUN)
    _equal(model.state_dict(), expected["weights"])


def test_each_expert_range_loads_its_slice(expected: dict[str, Any]) -> None:
    ckpt = RUN / "checkpoints" / "step-2"
    for start, end in [(0, 2), (1, 3), (2, 4)]:
        weights = load_model_state(ckpt, (start, end))
        cut = {n: t[start:end] if is_expert_param(n) else t for n, t in expected["weights"].items()}
        _equal(weights, cut)
        named, step = load_optimizer_state(ckpt, (start, end))
        assert step == 2
        _equal(
            named,
            {n: {k: cut_state(n, v, start, end) for k, v in s.items()} for n, s in expected["optim"].items()},
        )


def cut_state(name: str, value: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """An expert parameter's moments hold every expert; the step (0-dim) is shared."""
    return value[start:end] if is_expert_param(name) and value.dim() else value


def test_the_old_run_resumes_into_todays_backend(expected: dict[str, Any]) -> None:
    ckpt = RUN / "checkpoints" / "step-2"
    cfg = load_config(ckpt / "config.yaml")
    cfg = cfg.replace(parallel=ParallelConfig(ep_size=1))  # one process here: every expert
    model = MoETransformer(cfg.model)
    backend = build_backend(
        cfg,
        start_processes(cfg),
        model,
        param_groups(model, cfg.optim.weight_decay),
        optimizer_factory(cfg.optim),
        lr_lambda(cfg.optim, cfg.train),
    )
    state = load_checkpoint(cfg, backend, ckpt)
    _equal(model.state_dict(), expected["weights"])
    _equal(backend.optimizer_state(), expected["optim"])
    assert [g["lr"] for g in backend.optimizer.param_groups] == expected["lr"]
    assert state["trainer"]["step"] == 2 and state["rank"]["loader"] == {"epoch": 0, "position": 4}
