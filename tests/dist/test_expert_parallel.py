"""Two gloo processes with expert parallelism (and plain DDP) equal one process running both
ranks' shards as a gradient accumulation of 2: forward, gradients, 5 AdamW steps, checkpoints
across EP sizes. Fixtures (the launches) are in conftest.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.dist.compare import gather, losses_of_shard, max_err, shard
from tests.dist.conftest import SAVE_AT, record

pytestmark = pytest.mark.slow
CASES = ["dropless", "capacity"]


def _runs(ddp_runs: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    return [r[case] for r in ddp_runs]


@pytest.mark.parametrize("case", [*CASES, "ddp_no_ep"])
def test_forward_matches_one_process(
    reference: dict[str, Any], ddp_runs: list[dict[str, Any]], case: str
) -> None:
    ref = reference["capacity" if case == "capacity" else "dropless"]
    for rank, run in enumerate(_runs(ddp_runs, case)):
        loss_err = abs(run["losses"][0] - ref["losses"][rank])
        logit_err = float((run["logits"][0] - ref["logits"][rank]).abs().max())
        record(f"{case}: step-0 loss", loss_err)
        record(f"{case}: step-0 logits", logit_err)
        assert loss_err < 1e-5 and logit_err < 1e-5
        assert run["dropped"][0] == ref["dropped"][rank]


def test_capacity_case_drops_tokens(reference: dict[str, Any]) -> None:
    # Otherwise the capacity case would test nothing the dropless one does not.
    assert sum(reference["capacity"]["dropped"]) > 0
    assert sum(reference["dropless"]["dropped"]) == 0


@pytest.mark.parametrize("case", [*CASES, "ddp_no_ep"])
def test_gradients_match_one_process(
    reference: dict[str, Any], ddp_runs: list[dict[str, Any]], case: str
) -> None:
    ref = reference["capacity" if case == "capacity" else "dropless"]
    runs = _runs(ddp_runs, case)
    err = max_err(gather(runs, "grads"), ref["grads"])
    record(f"{case}: gradients", err)
    assert err < 1e-5
    for run in runs:  # the clipping norm is global: the same on every rank, and one process's
        assert abs(run["norm"] - ref["norm"]) < 1e-5 * ref["norm"]
    dense = {n: g for n, g in runs[0]["grads"].items() if ".experts." not in n}
    assert max_err(dense, {n: runs[1]["grads"][n] for n in dense}) == 0.0


@pytest.mark.parametrize("case", [*CASES, "ddp_no_ep"])
def test_weights_after_five_steps_match(
    reference: dict[str, Any], ddp_runs: list[dict[str, Any]], case: str
) -> None:
    ref = reference["capacity" if case == "capacity" else "dropless"]
    runs = _runs(ddp_runs, case)
    err = max_err(gather(runs, "weights"), ref["weights"])
    record(f"{case}: weights after 5 AdamW steps", err)
    assert err < 1e-4
    for rank, run in enumerate(runs):
        loss_err = max(
            abs(a - b) for a, b in zip(run["losses_run"], losses_of_shard(ref["losses_run"], rank))
        )
        record(f"{case}: losses over 5 steps", loss_err)
        assert loss_err < 1e-4
    # Aux-free bias buffers route tokens: they must stay identical on every rank.
    biases = [{n: t for n, t in run["weights"].items() if n.endswith("expert_bias")} for run in runs]
    if case != "capacity":
        assert biases[0] and max_err(biases[0], biases[1]) == 0.0
        assert max_err(biases[0], {n: ref["weights"][n] for n in biases[0]}) == 0.0


def test_ep2_checkpoint_resumes_at_ep1(
    one_proc_resumes: dict[str, Any], ddp_runs: list[dict[str, Any]], reference: dict[str, Any]
) -> None:
    resumed = one_proc_resumes["ep2"]
    saved = [r["dropless"]["saved"] for r in ddp_runs]
    assert max_err(resumed["loaded"]["weights"], gather(saved, "weights")) == 0.0
    assert max_err(resumed["loaded"]["optim"], gather(saved, "optim")) == 0.0
    assert resumed["loaded"]["lr"] == reference["dropless"]["saved"]["lr"]
    # ... and training continues as the uninterrupted one-process run did.
    ref_losses = reference["dropless"]["losses_run"][2 * SAVE_AT :]
    err = max(abs(a - b) for a, b in zip(resumed["losses_run"], ref_losses, strict=True))
    record("checkpoint EP=2 -> EP=1: losses after resume", err)
    assert err < 1e-4
    assert max_err(resumed["weights"], reference["dropless"]["weights"]) < 1e-4


def test_ep1_checkpoint_resumes_at_ep2(ddp_runs: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    ref_saved = reference["dropless"]["saved"]
    for rank, run in enumerate(r["resume_from_ep1"] for r in ddp_runs):
        held = run["loaded"]["expert_range"]
        assert held == (4 * rank, 4 * rank + 4)
        assert max_err(run["loaded"]["weights"], shard(ref_saved["weights"], held)) == 0.0
        assert max_err(run["loaded"]["optim"], shard(ref_saved["optim"], held)) == 0.0
        assert run["loaded"]["lr"] == ref_saved["lr"]
        ref_losses = losses_of_shard(reference["dropless"]["losses_run"], rank)[SAVE_AT:]
        err = max(abs(a - b) for a, b in zip(run["losses_run"], ref_losses, strict=True))
        record("checkpoint EP=1 -> EP=2: losses after resume", err)
        assert err < 1e-4
    resumed = [r["resume_from_ep1"] for r in ddp_runs]
    assert max_err(gather(resumed, "weights"), reference["dropless"]["weights"]) < 1e-4
