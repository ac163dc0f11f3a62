"""DeepSpeed ZeRO-0/1/2 with EP=2 on two gloo processes equals one process; its checkpoints (gathered
through DeepSpeed's tensor-fragment API) resume under DDP at EP=1, and DDP checkpoints resume under
ZeRO. Fixtures (the launches) are in conftest.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.dist.compare import gather, losses_of_shard, max_err, shard
from tests.dist.conftest import CLIP, SAVE_AT, record

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("fixture", ["zero0", "zero1", "zero2"])
def test_zero_ep2_matches_one_process_after_five_steps(
    request: pytest.FixtureRequest, reference: dict[str, Any], fixture: str
) -> None:
    runs: list[dict[str, Any]] = request.getfixturevalue(fixture)
    ref = reference["dropless"]
    err = max_err(gather(runs, "weights"), ref["weights"])
    record(f"{fixture}: weights after 5 AdamW steps", err)
    assert err < 1e-4
    moments = max_err(gather(runs, "optim"), ref["optim"])
    record(f"{fixture}: Adam moments after 5 steps", moments)
    assert moments < 1e-4
    for rank, run in enumerate(runs):
        loss_err = max(
            abs(a - b) for a, b in zip(run["losses_run"], losses_of_shard(ref["losses_run"], rank))
        )
        record(f"{fixture}: losses over 5 steps", loss_err)
        assert loss_err < 1e-4
        record(f"step time, tiny test model: {fixture} EP=2 (s)", run["step_s"])


@pytest.mark.parametrize("fixture", ["zero0", "zero1", "zero2"])
def test_zero_ep2_clips_with_the_global_norm(
    request: pytest.FixtureRequest, reference: dict[str, Any], fixture: str
) -> None:
    # The norm each step reports is the one it clipped with: dense gradients once plus every
    # rank's experts, the same as one process holding all experts (and never NaN).
    runs: list[dict[str, Any]] = request.getfixturevalue(fixture)
    ref_norms = reference["dropless"]["norms_run"]
    assert len(ref_norms) == 5 and ref_norms[0] > CLIP  # clipping is active at step 0
    for run in runs:
        err = max(abs(a - b) / b for a, b in zip(run["norms_run"], ref_norms, strict=True))
        record(f"{fixture}: relative grad-norm error over 5 steps", err)
        assert err < 1e-5


def test_ddp_ep1_checkpoint_resumes_under_zero1_ep2(
    zero1: list[dict[str, Any]], reference: dict[str, Any]
) -> None:
    ref = reference["dropless"]
    resumed = [run["resumed"] for run in zero1]  # the engine had trained 5 steps before loading
    for run in resumed:
        held = run["expert_range"]
        assert max_err(run["loaded"]["weights"], shard(ref["saved"]["weights"], held)) == 0.0
        assert max_err(run["loaded"]["optim"], shard(ref["saved"]["optim"], held)) == 0.0
        assert set(run["loaded"]["lr"]) == set(ref["saved"]["lr"])  # DeepSpeed splits out expert groups
    err = max_err(gather(resumed, "weights"), ref["weights"])
    record("checkpoint DDP EP=1 -> ZeRO-1 EP=2: weights at step 5", err)
    assert err < 1e-4
    for rank, run in enumerate(resumed):
        ref_losses = losses_of_shard(ref["losses_run"], rank)[SAVE_AT:]
        assert max(abs(a - b) for a, b in zip(run["losses_run"], ref_losses, strict=True)) < 1e-4


def test_zero2_ep2_checkpoint_resumes_under_ddp_ep1(
    one_proc_resumes: dict[str, Any], zero2: list[dict[str, Any]], reference: dict[str, Any]
) -> None:
    resumed = one_proc_resumes["zero2"]
    saved = [run["saved"] for run in zero2]
    for run in zero2:
        run["saved"]["expert_range"] = run["expert_range"]
    assert max_err(resumed["loaded"]["weights"], gather(saved, "weights")) == 0.0
    assert max_err(resumed["loaded"]["optim"], gather(saved, "optim")) == 0.0
    ref_losses = reference["dropless"]["losses_run"][2 * SAVE_AT :]
    err = max(abs(a - b) for a, b in zip(resumed["losses_run"], ref_losses, strict=True))
    record("checkpoint ZeRO-2 EP=2 -> DDP EP=1: losses after resume", err)
    assert err < 1e-4
