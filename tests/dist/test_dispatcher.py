"""AllToAllDispatcher on hand-picked routings, against LocalDispatcher over all experts: uneven
splits, a rank whose experts receive nothing (it must still join the backward exchange), a
capacity limit."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_lm.model.dispatch import LocalDispatcher
from tests.dist.harness import run_workers
from tests.dist.scenarios import dispatcher_inputs

pytestmark = pytest.mark.slow
# 4 experts over 2 ranks (experts 0-1 on rank 0, 2-3 on rank 1); each row is one token's top-2.
CASES = {
    "uneven": {"tokens": [3, 5], "routes": [[0, 3, 1, 2, 3, 2], [0, 1, 2, 3, 1, 0, 3, 0, 2, 1]]},
    "rank1_gets_nothing": {"tokens": [2, 3], "routes": [[0, 1, 1, 0], [1, 0, 0, 1, 1, 0]]},
    "capacity": {"tokens": [4, 4], "routes": [[0, 1] * 4, [0, 2, 0, 3, 1, 0, 2, 3]], "capacity": 2},
}


def _one_process(case: dict[str, Any]) -> list[dict[str, Any]]:
    """Both ranks' tokens through all experts in one process; expert grads summed over both."""
    outs = []
    experts = None
    for rank in range(2):
        experts_r, x_TH, idx_TK, w_TK = dispatcher_inputs(rank, {**case, "experts": 4})
        experts = experts or experts_r
        y_TH, dropped = LocalDispatcher()(x_TH, idx_TK, w_TK, experts, 4, case.get("capacity"))
        (y_TH * y_TH).sum().backward()
        outs.append({"y": y_TH.detach(), "x_grad": x_TH.grad, "dropped": int(dropped)})
    assert experts is not None
    for out in outs:
        out["grads"] = {n: p.grad for n, p in experts.named_parameters()}
    return outs


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    jobs = {name: {"fn": "dispatcher_case", "args": {**case, "experts": 4}} for name, case in CASES.items()}
    return run_workers("tests.dist.scenarios:many", 2, jobs)


@pytest.mark.parametrize("name", list(CASES))
def test_all_to_all_dispatch_matches_local(two_ranks: list[dict[str, Any]], name: str) -> None:
    case = CASES[name]
    ranks = [r[name] for r in two_ranks]
    ref = _one_process(case)
    for rank, (got, want) in enumerate(zip(ranks, ref)):
        torch.testing.assert_close(got["y"], want["y"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["x_grad"], want["x_grad"], atol=1e-6, rtol=1e-5)
        assert got["dropped"] == want["dropped"]
        for n, g in got["grads"].items():
            torch.testing.assert_close(g, want["grads"][n][2 * rank : 2 * rank + 2], atol=1e-6, rtol=1e-5)
    if name == "rank1_gets_nothing":
        assert ranks[1]["received"] == 0 and ranks[0]["received"] == 10
    if name == "capacity":
        assert sum(r["dropped"] for r in ranks) > 0
