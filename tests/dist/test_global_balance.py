"""model.aux_loss_scope: global_batch on two gloo processes equals one process holding the whole
global batch as one micro-batch: losses, gradients and weights after AdamW steps, under DDP,
expert parallelism (with and without accumulation) and DeepSpeed ZeRO-2. Fixtures in conftest.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.dist.compare import gather, max_err
from tests.dist.conftest import GLOBAL_STEPS, record

pytestmark = pytest.mark.slow
CASES = ["ddp_accum2", "ep2_accum1", "ep2_accum2"]


def _step_losses(runs: list[dict[str, Any]], key: str = "losses_run") -> list[float]:
    """Per step, the mean over processes and micro-batches (what the trainer reports)."""
    steps = len(runs[0][key])
    return [sum(sum(r[key][s]) / len(r[key][s]) for r in runs) / len(runs) for s in range(steps)]


def _runs(global_runs: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    return [r[case] for r in global_runs]


def test_accumulation_in_one_process_matches(global_reference: dict[str, Any]) -> None:
    ref, run = global_reference["whole"], global_reference["accum4"]
    assert len(run["losses"]) == 4 and len(ref["losses"]) == 1
    err = max_err(run["grads"], ref["grads"])
    record("global batch: 1 process x 4 micro-batches, gradients", err)
    assert err < 1e-5
    assert abs(sum(run["losses"]) / 4 - ref["losses"][0]) < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_one_process_holding_the_global_batch(
    global_reference: dict[str, Any], global_runs: list[dict[str, Any]], case: str
) -> None:
    ref, runs = global_reference["whole"], _runs(global_runs, case)
    loss = sum(sum(r["losses"]) / len(r["losses"]) for r in runs) / len(runs)
    record(f"global batch {case}: step-0 loss", abs(loss - ref["losses"][0]))
    assert abs(loss - ref["losses"][0]) < 1e-5
    err = max_err(gather(runs, "grads"), ref["grads"])
    record(f"global batch {case}: gradients", err)
    assert err < 1e-5
    for run in runs:
        assert abs(run["norm"] - ref["norm"]) < 1e-5 * ref["norm"]


@pytest.mark.parametrize("case", CASES)
def test_weights_after_steps_match(
    global_reference: dict[str, Any], global_runs: list[dict[str, Any]], case: str
) -> None:
    ref, runs = global_reference["whole"], _runs(global_runs, case)
    err = max_err(gather(runs, "weights"), ref["weights"])
    record(f"global batch {case}: weights after {GLOBAL_STEPS} AdamW steps", err)
    record(f"step time, tiny test model: global batch {case} (s)", max(r["step_s"] for r in runs))
    assert err < 1e-4
    loss_err = max(abs(a - b) for a, b in zip(_step_losses(runs), _step_losses([ref]), strict=True))
    assert loss_err < 1e-4


def test_per_micro_batch_balancing_differs(
    global_reference: dict[str, Any], global_runs: list[dict[str, Any]]
) -> None:
    # The same split balanced per micro-batch and rank: the comparisons above can fail.
    ref, runs = global_reference["whole"], _runs(global_runs, "ep2_micro_batch")
    routers = {n: g for n, g in ref["grads"].items() if n.endswith("router.weight")}
    gathered = gather(runs, "grads")
    assert max_err({n: gathered[n] for n in routers}, routers) > 1e-3
    record("step time, tiny test model: micro batch ep2_accum1 (s)", max(r["step_s"] for r in runs))


def test_deepspeed_zero2_ep2_matches(
    global_reference: dict[str, Any], global_zero2: list[dict[str, Any]]
) -> None:
    ref, runs = global_reference["whole"], [r["zero2"] for r in global_zero2]
    err = max_err(gather(runs, "weights"), ref["weights"])
    record(f"global batch ZeRO-2 EP=2 accum 2: weights after {GLOBAL_STEPS} steps", err)
    assert err < 1e-4
    loss_err = max(abs(a - b) for a, b in zip(_step_losses(runs), _step_losses([ref]), strict=True))
    assert loss_err < 1e-4
