"""`moe-lm train` with model.aux_loss_scope global_batch: 2 accumulated micro-batches of 4 train
exactly like one micro-batch of the same 8 sequences (losses and aux loss per step, final weights);
balanced per micro-batch, they do not."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_lm.state.weights import load_model_state
from tests.integration.test_train import records, train, write


def _run(make_config, tmp_path: Path, name: str, scope: str, micro: int, accum: int) -> Path:
    cfg = make_config(
        name,
        model={"aux_loss_scope": scope, "aux_loss_coef": 1.0},
        data={"document_mask": True},
        train={"micro_batch_size": micro, "grad_accum_steps": accum, "max_steps": 4},
    )
    assert train(write(cfg, tmp_path / f"{name}.yaml")) == 0
    return cfg.output_dir


def test_accumulation_trains_like_one_big_micro_batch(make_config, tmp_path):
    whole = _run(make_config, tmp_path, "whole", "global_batch", 8, 1)
    split = _run(make_config, tmp_path, "split", "global_batch", 4, 2)
    micro = _run(make_config, tmp_path, "micro", "micro_batch", 4, 2)
    ref, got, per_micro = records(whole), records(split), records(micro)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], abs=1e-5)
        assert a["expert_load"] == b["expert_load"]  # the same routing
    assert max(abs(a["aux_loss"] - b["aux_loss"]) for a, b in zip(per_micro, ref)) > 1e-3
    w_ref = load_model_state(whole / "checkpoints" / "step-4")
    w_got = load_model_state(split / "checkpoints" / "step-4")
    assert max(float((w_got[k] - w_ref[k]).abs().max()) for k in w_ref) < 1e-4
