"""The plan's numbers against real CPU runs (docs/plan.md, "How close the plan is").

Memory: a rehearsal of configs/tiny-shakespeare.yaml for a CPU process against the peak of torch's
CPU allocator in real runs of the same sequence (tests/dist/plan_scenarios.py): 1 process (EP 1;
activation checkpointing; accumulation) and 2 gloo processes (DDP; EP 2). Within 10%; 15% for 2
processes, whose measured peak has two modes (below).
Traffic: the rehearsal of rank 0 of an EP=2 run, fed the routing that run's rank 0 had (its seam's
answers, replayed), hands all_to_all exactly the bytes the run moved.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_lm.config import load_config
from moe_lm.model.split_sizes import Over
from moe_lm.plan.gpus import GIB, cpu_target
from moe_lm.plan.rehearsal import Rehearsal, rehearse
from moe_lm.plan.routing import AssumedRouting
from tests.dist.conftest import record
from tests.dist.harness import run_workers
from tests.integration.conftest import REPO

TINY = str(REPO / "configs" / "tiny-shakespeare.yaml")
ONE_PROCESS = {
    "ep1": [],
    "ep1 checkpointing": ["train.activation_checkpointing=true"],
    "ep1 accumulation 2 x 8": ["train.micro_batch_size=8", "train.grad_accum_steps=2"],
}
TWO_PROCESSES = {"ddp": ["parallel.ep_size=1"], "ep2": ["parallel.ep_size=2"]}
SCENARIO = "tests.dist.plan_scenarios:measured_runs"


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict[str, Any]]:
    runs = [(TINY, overrides) for overrides in ONE_PROCESS.values()]
    return dict(zip(ONE_PROCESS, run_workers(SCENARIO, 1, {"runs": runs})[0]))


@pytest.fixture(scope="module")
def two_processes() -> dict[str, dict[str, Any]]:
    # rank 0's report; one launch per case (a process joins one process group)
    return {name: run_workers(SCENARIO, 2, {"runs": [(TINY, o)]})[0][0] for name, o in TWO_PROCESSES.items()}


def _plan(overrides: list[str], world: int, routing: Any = None, full_depth: bool = False) -> Rehearsal:
    cfg = load_config(TINY, overrides)
    routing = routing or AssumedRouting(cfg.model.num_experts)
    return rehearse(cfg, world, cpu_target(24 * GIB), routing, full_depth=full_depth)


def _training_peak(r: Rehearsal) -> int:
    return max(r.phase_peaks["forward/backward"], r.phase_peaks["optimizer step"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ONE_PROCESS))
def test_plan_memory_within_10_percent_of_one_process(name: str, one_process: dict[str, Any]) -> None:
    measured = one_process[name]["peak"]
    planned = _training_peak(_plan(ONE_PROCESS[name], 1))
    print(f"1 process, {name}: plan {planned:,} bytes, measured {measured:,} ({planned / measured - 1:+.2%})")
    record(f"plan vs measured memory, 1 process, {name}", abs(planned / measured - 1))
    assert abs(planned / measured - 1) < 0.10


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TWO_PROCESSES))
def test_plan_memory_within_10_percent_of_two_processes(name: str, two_processes: dict[str, Any]) -> None:
    measured = two_processes[name]["peak"]
    planned = _training_peak(_plan(TWO_PROCESSES[name], 2))
    print(
        f"2 processes, {name}: plan {planned:,} bytes, measured {measured:,} ({planned / measured - 1:+.2%})"
    )
    record(f"plan vs measured memory, 2 processes, {name}", abs(planned / measured - 1))
    # The measured peak of 2 gloo processes has two modes: a collective's buffers are sometimes still
    # held at the next step's peak (DDP 148.7 or 164.2 MB; EP 2 140.5 to 153.8 MB, -1.8% to -10.3%,
    # in identical runs). The plan is the steady state; 15% admits the high mode, not a missing tensor.
    assert abs(planned / measured - 1) < 0.15


class _Replay:
    """The routing a real rank had: its seam's answers in order, then balanced."""

    def __init__(self, answers: list[list[int]], num_experts: int) -> None:
        self.answers, self.num_experts = answers, num_experts

    def reader(self, ep_size: int, ep_rank: int) -> Any:
        balanced = AssumedRouting(self.num_experts).reader(ep_size, ep_rank)
        answers = iter(self.answers)

        def read(counts: torch.Tensor, rows: int, over: Over) -> list[int]:
            read.calls += 1  # type: ignore[attr-defined]
            return next(answers, None) or balanced(counts, rows, over)

        read.calls = 0  # type: ignore[attr-defined]
        return read


@pytest.mark.slow
def test_predicted_all_to_all_bytes_equal_an_ep2_gloo_run(two_processes: dict[str, Any]) -> None:
    run = two_processes["ep2"]
    assert run["all_to_all_bytes"] > 0 and run["answers"]
    r = _plan(TWO_PROCESSES["ep2"], 2, _Replay(run["answers"], 8), full_depth=True)
    assert r.traffic["all_to_all"] == run["all_to_all_bytes"]
