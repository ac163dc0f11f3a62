"""Instruction tuning across processes: two processes with expert parallelism (DDP, and DeepSpeed
ZeRO-2) train on packed conversations as one process running the global batch at once does. The
loss is over the step's assistant tokens of every process together, so the per-rank split of
rows with different numbers of targets must not change it (a mean of per-rank means would)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moe_lm.state.weights import load_model_state
from tests.dist.conftest import record
from tests.dist.harness import run_workers
from tests.integration.chat_data import chat_sections, conversations, write_jsonl
from tests.integration.conftest import REPO, run_config_dict

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from moe_lm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sft-dist")
    corpus = root / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    tokenizer = train_tokenizer([str(corpus)], 384, root / "tokenizer")
    train = write_jsonl(root / "train.jsonl", conversations(200, seed=0))
    val = write_jsonl(root / "val.jsonl", conversations(16, seed=1))

    def cfg(name: str, micro: int, **parallel: Any) -> dict[str, Any]:
        return run_config_dict(
            corpus,
            tokenizer,
            root / name,
            data=chat_sections(train, val, cache_dir=str(root / "cache")),
            train={"micro_batch_size": micro, "max_steps": STEPS, "eval_every": 0, "eval_batches": 8},
            parallel=parallel,
            # the load-balancing loss over the global batch too, so the two processes' steps equal the
            # one process's micro-batch of 8 in every term (per micro-batch it would differ by design)
            model={"aux_free_bias": True, "aux_loss_scope": "global_batch"},
        )

    return root, cfg


def _records(run: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(setup: tuple[Path, Any], deepspeed_ops: None) -> Path:
    root, cfg = setup
    run_workers("tests.dist.sft_scenarios:many", 1, {"one": {"cfg": cfg("one", 8)}})
    run_workers("tests.dist.sft_scenarios:many", 2, {"ep2": {"cfg": cfg("ep2", 4, ep_size=2)}})
    zero2 = {"backend": "deepspeed", "zero_stage": 2, "ep_size": 2}
    run_workers("tests.dist.sft_scenarios:many", 2, {"zero2": {"cfg": cfg("zero2", 4, **zero2)}})
    return root


@pytest.mark.parametrize("case", ["ep2", "zero2"])
def test_two_processes_with_ep2_equal_one_process(runs: Path, case: str) -> None:
    one, two = _records(runs / "one", "train"), _records(runs / case, "train")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        assert a["target_tokens"] == b["target_tokens"]  # counted over both processes
        err = abs(a["lm_loss"] - b["lm_loss"])
        record(f"sft {case}: lm_loss vs one process", err)
        assert err < 1e-5
    for a, b in zip(_records(runs / "one", "eval"), _records(runs / case, "eval"), strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-5 and b["loss_on"] == "assistant"
    wa = load_model_state(runs / "one" / "checkpoints" / f"step-{STEPS}")
    wb = load_model_state(runs / case / "checkpoints" / f"step-{STEPS}")
    err = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    record(f"sft {case}: weights after {STEPS} steps", err)
    assert err < 1e-4
