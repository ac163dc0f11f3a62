"""Validation through the real Trainer: `train.eval_batches` counts the micro-batches of all
processes, so one process and two (DDP, or EP=2 with its all-to-alls) report the same loss, and
the same routing repetition rates (counts summed over processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.dist.conftest import record
from tests.dist.harness import run_workers
from tests.integration.conftest import run_config_dict

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_one_and_two_processes_report_the_same_validation_loss(tmp_path: Path) -> None:
    from moe_lm.data.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    tokenizer = train_tokenizer([str(corpus)], 384, tmp_path / "tokenizer")

    def job(name: str, ep_size: int) -> dict[str, Any]:
        cfg = run_config_dict(
            corpus, tokenizer, tmp_path / name, train={"eval_batches": 4}, parallel={"ep_size": ep_size}
        )
        return {"fn": "trainer_evaluate", "args": {"cfg": cfg}}

    one = run_workers("tests.dist.scenarios:many", 1, {"one": job("one", 1)})[0]["one"]
    two = run_workers("tests.dist.scenarios:many", 2, {"ddp": job("ddp", 1), "ep2": job("ep2", 2)})
    for case in ("ddp", "ep2"):
        for rank in range(2):
            err = abs(two[rank][case]["val_loss"] - one["val_loss"])
            record(f"validation loss, 2 processes ({case}) vs 1", err)
            assert err < 1e-5
            for key in ("repetition_first", "repetition_either"):
                assert two[rank][case][key] == pytest.approx(one[key], abs=1e-9)
    assert 0 < one["repetition_first"][0] < one["repetition_either"][0] < 1
