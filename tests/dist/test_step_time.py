"""EP=2 vs EP=1 step time on this machine (printed in the session summary, never asserted) and the
per-rank load metrics the backend reports, on the tiny-shakespeare model shape. The timed runs
ride along in the reference and DDP launches (conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.dist.conftest import TIMING, record

pytestmark = pytest.mark.slow


def test_step_time_and_per_rank_load(reference: dict[str, Any], ddp_runs: list[dict[str, Any]]) -> None:
    one = reference["step_time"]
    ep1, ep2 = ([r[f"step_time_ep{ep}"] for r in ddp_runs] for ep in (1, 2))
    record("step time, tiny-shakespeare shape: 1 process (s)", one["step_s"])
    record("step time, tiny-shakespeare shape: 2 processes DDP EP=1 (s)", max(r["step_s"] for r in ep1))
    record("step time, tiny-shakespeare shape: 2 processes EP=2 (s)", max(r["step_s"] for r in ep2))
    metrics = ep2[0]["metrics"]
    assert metrics == ep2[1]["metrics"]  # gathered: every rank reports every rank
    # Dropless: each routed (token, slot) row of the step lands on exactly one rank, in each of the
    # 4 MoE layers; the evaluation pass run before the last report is not counted.
    assert sum(metrics["ep_tokens_received"]) == TIMING["batch"] * 128 * 2 * 4
    assert len(metrics["ep_a2a_ms"]) == 2 and min(metrics["ep_a2a_ms"]) > 0
    record("EP=2 all-to-all ms per step (max rank)", max(metrics["ep_a2a_ms"]))
    assert ep1[0]["metrics"] == {} and one["metrics"] == {}
