"""A checkpoint written by an earlier moe_lm (commit 376ac16: 2 processes, EP=2, DDP, aux-free
bias, 2 AdamW steps; tests/data/make_old_checkpoint.py) still loads to the very tensors that run
held in memory (`expected.pt`): weights, Adam moments, learning rate, loader position. Its pickle
files (optim-*.pt, rank*.pt) are read by the restricted unpickler: nothing in them runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moe_lm.config import ParallelConfig, load_config
from moe_lm.data.loader import ResumableLoader
from moe_lm.model import MoETransformer
from moe_lm.model.params import is_expert_param
from moe_lm.parallel.layout import start_processes
from moe_lm.parallel.parallelize import build_backend
from moe_lm.state.checkpoint import load_checkpoint
from moe_lm.state.optimizer import load_optimizer_state
from moe_lm.state.resolve import resolve_checkpoint
from moe_lm.state.run_state import RunState, load_run_state
from moe_lm.state.weights import load_model_state, load_pretrained
from moe_lm.train.optim import lr_lambda, optimizer_factory, param_groups

RUN = Path(__file__).resolve().parents[1] / "data" / "ckpt-376ac16"


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return torch.load(RUN / "expected.pt", weights_only=True)


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
    assert state is not None
    _equal(model.state_dict(), expected["weights"])
    _equal(backend.optimizer_state(), expected["optim"])
    assert [g["lr"] for g in backend.optimizer.param_groups] == expected["lr"]
    assert state.trainer["step"] == 2 and state.data_position is None
    # each rank's loader state, completed from the checkpoint's config (micro-batch 2, 2 processes)
    legacy = {"epoch": 0, "position": 4, "seed": 1337, "micro_batch_size": 2, "dp_size": 2}
    assert state.legacy_loader_states == [legacy, legacy]
    assert state.rng is None  # written by 2 processes: this one starts its RNG stream from the seed


def test_the_old_loader_position_becomes_the_global_one() -> None:
    """4 batches of 2 on each of 2 processes = 16 samples into epoch 0, in the old randperm order;
    one process with micro-batch 4 continues with samples 16..19 of that order."""
    ckpt = RUN / "checkpoints" / "step-2"
    state = load_checkpoint_state(ckpt)
    blocks = torch.arange(100 * 3).view(100, 3)
    loader = ResumableLoader(blocks, micro_batch_size=4, seed=0)
    assert loader.load_state_dict(state.legacy_loader_states) == []  # same global batch: nothing to say
    x, _ = loader.next_batch()
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1337))
    assert (x[:, 0] // 3).tolist() == perm[16:20].tolist()
    assert loader.consumed() == {"corpus": 20}


def load_checkpoint_state(ckpt: Path) -> RunState:
    return load_run_state(ckpt, load_config(ckpt / "config.yaml"), rank=0, world_size=1)
