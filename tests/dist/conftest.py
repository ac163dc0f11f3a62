"""Session fixtures for the 2-process tests: each launch runs once and several tests read it.

Process start-up dominates (≈3 s per launch, ≈10 s with DeepSpeed), so the runs are grouped:
one 1-process reference, one 2-process DDP launch (EP=2 dropless and with capacity, DDP without
EP, resume from the EP=1 checkpoint; step times ride along), one launch per ZeRO stage (0, 1, 2), one
1-process resume launch.
Measured errors and step times are collected in MEASURED and printed at the end of the session.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.dist.harness import run_workers

STEPS, SAVE_AT, CLIP = 5, 3, 1.0
DROPLESS: dict[str, Any] = {"aux_free_bias": True}
CAPACITY: dict[str, Any] = {"capacity_factor": 1.0}
TIMING: dict[str, Any] = {"batch": 16, "steps": 3}  # tiny-shakespeare shape, 16 × 128 tokens per step
MEASURED: dict[str, float] = {}


def record(name: str, value: float) -> None:
    worst = MEASURED.get(name, 0.0)
    if not math.isnan(worst):  # a NaN stays: it is the worst there is
        MEASURED[name] = value if math.isnan(value) else max(worst, value)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASURED:
        terminalreporter.section("tests/dist: measured (max abs error / seconds per step)")
        for name, value in sorted(MEASURED.items()):
            terminalreporter.write_line(f"{name:<52} {value:.3g}")


def _job(fn: str, **args: Any) -> dict[str, Any]:
    return {"fn": fn, "args": args}


@pytest.fixture(scope="session")
def ckpt_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: root / name for name in ("ep1", "ep2", "zero2")}


@pytest.fixture(scope="session")
def reference(ckpt_dirs: dict[str, Path]) -> dict[str, Any]:
    """One process, accum 2 over both shards; saves an EP=1 checkpoint after SAVE_AT steps."""
    one = {"ep_size": 1, "accum": 2}
    jobs = {
        "dropless": _job(
            "equivalence",
            cfg={**one, **DROPLESS},
            steps=STEPS,
            clip=CLIP,
            save_at=SAVE_AT,
            save_dir=str(ckpt_dirs["ep1"]),
        ),
        "capacity": _job("equivalence", cfg={**one, **CAPACITY}, steps=STEPS, clip=CLIP),
        "step_time": _job("step_time", ep_size=1, **TIMING),
    }
    return run_workers("tests.dist.scenarios:many", 1, jobs)[0]


@pytest.fixture(scope="session")
def ddp_runs(reference: dict[str, Any], ckpt_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """Two processes: EP=2 (dropless, saving a checkpoint; capacity), DDP without EP, EP=2
    resumed from the one-process checkpoint, and the step timings."""
    jobs = {
        "dropless": _job(
            "equivalence",
            cfg={"ep_size": 2, **DROPLESS},
            steps=STEPS,
            clip=CLIP,
            save_at=SAVE_AT,
            save_dir=str(ckpt_dirs["ep2"]),
        ),
        "capacity": _job("equivalence", cfg={"ep_size": 2, **CAPACITY}, steps=STEPS, clip=CLIP),
        "ddp_no_ep": _job("equivalence", cfg={"ep_size": 1, **DROPLESS}, steps=STEPS, clip=CLIP),
        "resume_from_ep1": _job(
            "resume",
            cfg={"ep_size": 2, **DROPLESS},
            load_dir=str(ckpt_dirs["ep1"]),
            first=SAVE_AT,
            steps=STEPS,
            clip=CLIP,
        ),
        "step_time_ep1": _job("step_time", ep_size=1, **TIMING),
        "step_time_ep2": _job("step_time", ep_size=2, **TIMING),
    }
    return run_workers("tests.dist.scenarios:many", 2, jobs)


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """DeepSpeed compiles a comm op on first start (~100 s, cached in the environment's
    torch_extensions/, moe_lm/libraries.py): build it here, once, outside every test's own time."""
    from moe_lm.parallel.deepspeed_backend import warm_deepspeed_ops

    warm_deepspeed_ops()


def _deepspeed(stage: int, **args: Any) -> list[dict[str, Any]]:
    cfg = {"ep_size": 2, "zero_stage": stage, **DROPLESS}
    return run_workers(
        "tests.dist.scenarios:deepspeed_run",
        2,
        dict(cfg=cfg, steps=STEPS, clip=CLIP, save_at=SAVE_AT, **args),
    )


@pytest.fixture(scope="session")
def zero0(deepspeed_ops: None) -> list[dict[str, Any]]:
    """ZeRO-0 (DeepSpeed's plain data parallelism, fp32), EP=2, from scratch."""
    return _deepspeed(0)


@pytest.fixture(scope="session")
def zero1(deepspeed_ops: None, reference: dict[str, Any], ckpt_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """ZeRO-1, EP=2, from scratch; then the same engine resumes the one-process EP=1 (DDP)
    checkpoint written at step SAVE_AT."""
    return _deepspeed(1, load_dir=str(ckpt_dirs["ep1"]))


@pytest.fixture(scope="session")
def zero2(deepspeed_ops: None, ckpt_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """ZeRO-2, EP=2, from scratch; saves a checkpoint (gathered through DeepSpeed) after SAVE_AT."""
    return _deepspeed(2, save_dir=str(ckpt_dirs["zero2"]))


@pytest.fixture(scope="session")
def one_proc_resumes(
    ddp_runs: list[dict[str, Any]], zero2: list[dict[str, Any]], ckpt_dirs: dict[str, Path]
) -> dict[str, Any]:
    """One process (EP=1, DDP backend) resuming the EP=2 checkpoints of DDP and of ZeRO-2."""
    one = {"ep_size": 1, "accum": 2, **DROPLESS}
    jobs = {
        name: _job("resume", cfg=one, load_dir=str(ckpt_dirs[name]), first=SAVE_AT, steps=STEPS, clip=CLIP)
        for name in ("ep2", "zero2")
    }
    return run_workers("tests.dist.scenarios:many", 1, jobs)[0]


# ---- global-batch balancing (tests/dist/test_global_balance.py, global_scenarios.py) ----------

GLOBAL_STEPS = 3


def _global(accum: int, **cfg: Any) -> dict[str, Any]:
    return {"cfg": {"aux_loss_scope": "global_batch", **cfg}, "accum": accum, "steps": GLOBAL_STEPS}


@pytest.fixture(scope="session")
def global_reference() -> dict[str, Any]:
    """One process: the whole global batch as one micro-batch (the reference), and as 4 micro-batches."""
    jobs = {"whole": _global(1), "accum4": _global(4)}
    return run_workers("tests.dist.global_scenarios:many", 1, jobs)[0]


@pytest.fixture(scope="session")
def global_runs() -> list[dict[str, Any]]:
    """Two processes: DDP with 2 micro-batches each (a counting pass), EP=2 with one micro-batch
    each (counts summed inside the pass) and with 2 (counting pass through the all-to-all), and
    EP=2 balanced per micro-batch (which must differ from the reference)."""
    jobs = {
        "ddp_accum2": _global(2, ep_size=1),
        "ep2_accum1": _global(1, ep_size=2),
        "ep2_accum2": _global(2, ep_size=2),
        "ep2_micro_batch": {**_global(1, ep_size=2), "cfg": {"ep_size": 2, "aux_loss_scope": "micro_batch"}},
    }
    return run_workers("tests.dist.global_scenarios:many", 2, jobs)


@pytest.fixture(scope="session")
def global_zero2(deepspeed_ops: None) -> list[dict[str, Any]]:
    """DeepSpeed ZeRO-2, EP=2, 2 micro-batches per process."""
    jobs = {"zero2": _global(2, ep_size=2, backend="deepspeed", zero_stage=2)}
    return run_workers("tests.dist.global_scenarios:many", 2, jobs)
