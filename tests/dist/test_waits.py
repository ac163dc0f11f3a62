"""Bounded waits between processes (moe_lm/parallel/waits.py), in 2 real gloo processes: a barrier
ends at parallel.timeout naming the process it waited for and what that one was doing; it ends at
once when the other announces a failure or stops beating; the token store's barrier waits as long
as the preparer makes progress; a timed-out collective is explained from the other's heartbeat.

Before these waits, every barrier was gloo's, bounded only by the process group's default of 30
minutes, and its error ("Timed out waiting 1800000ms for recv operation") named no one."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.dist.harness import run_workers
from tests.dist.wait_scenarios import TIMEOUT_S

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Every scenario, in one pair of processes (about 25 s)."""
    return run_workers("tests.dist.wait_scenarios:many", 2)


def test_a_barrier_times_out_naming_the_late_process_and_what_it_does(ranks: list[dict[str, Any]]) -> None:
    waiter = ranks[0]["late_peer"]
    assert waiter["error"] == "WaitTimeout"
    # seconds are printed rounded, and a loaded machine may check a second late: \d+ for them
    assert re.fullmatch(
        r"process 0 waited \d+ s at 'writing checkpoint step-8' for process 1 \(parallel.timeout = 2 s\); "
        r"process 1 is at 'evaluation after step 7' \(for \d+ s\); raise parallel.timeout if that work is just slow",
        waiter["message"],
    ), waiter["message"]
    assert TIMEOUT_S - 0.1 <= waiter["seconds"] < TIMEOUT_S + 3  # (its clock is not the test's)


def test_a_failure_announced_by_the_other_process_ends_the_wait_at_once(ranks: list[dict[str, Any]]) -> None:
    waiter = ranks[1]["failed_peer"]
    assert waiter["error"] == "PeerFailed"
    assert waiter["message"] == (
        "process 0 failed during 'preparing the token store' (OSError: Corrupt snappy compressed data); "
        "process 1 stopped as a consequence: the cause is process 0's error"
    )
    assert waiter["seconds"] < TIMEOUT_S  # the failure came at 0.3 s


def test_a_process_that_stops_beating_is_taken_for_dead_before_the_timeout(
    ranks: list[dict[str, Any]],
) -> None:
    waiter = ranks[0]["silent_peer"]
    assert waiter["error"] == "PeerFailed"
    assert re.fullmatch(
        r"process 1 stopped responding during 'training step 3' \(no heartbeat for \d+ s\) while process 0 waited "
        r"at 'writing checkpoint step-4': it was most likely killed; see its exit status",
        waiter["message"],
    ), waiter["message"]
    assert waiter["seconds"] < 10.0  # the timeout is 60 s


def test_the_token_store_barrier_waits_while_the_preparer_progresses_and_not_longer(
    ranks: list[dict[str, Any]],
) -> None:
    waiter = ranks[1]["progressing_peer"]
    first, second = waiter["first"], waiter["second"]
    assert first["error"] is None and first["seconds"] > 2 * TIMEOUT_S  # past the timeout: progress went on
    assert second["error"] == "WaitTimeout"
    assert re.fullmatch(
        r"process 1 waited at 'preparing the validation store' and process 0 made no progress for \d+ s "
        r"\(parallel.timeout = 2 s\); process 0 is at 'stuck' \(for \d+ s\)",
        second["message"],
    ), second["message"]


def test_a_timed_out_collective_says_where_the_other_process_is(ranks: list[dict[str, Any]]) -> None:
    waiter = ranks[0]["timed_out_collective"]
    assert "Timed out waiting" in waiter["raw"]  # what gloo says: no process, no phase
    assert waiter["type"] == "WaitTimeout"
    assert re.fullmatch(
        r"process 0 timed out after 2 s \(parallel.timeout\) in a collective during 'training step 6'; "
        r"process 1 is at 'callback Evaluate after step 5' \(for \d+ s\)",
        waiter["message"],
    ), waiter["message"]


def test_a_second_run_in_the_same_process_group_does_not_pass_its_first_barrier_early(
    ranks: list[dict[str, Any]],
) -> None:
    """Runs joined the same keys: the second run's first checkpoint barrier found the first run's
    count complete, so process 1 wrote into a temp dir process 0 had not made yet."""
    waiter = ranks[0]["second_run"]
    assert waiter["error"] is None and waiter["seconds"] >= 0.8, waiter
