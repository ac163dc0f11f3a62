"""The chaos test (scripts/chaos_train.py) at its small size: 2 CPU processes with EP=2, a random
process SIGKILLed at a random moment three times, each followed by the same `moe-lm launch ...
train.resume=auto` command; the final weights equal an uninterrupted run's within the expert-
parallel tests' tolerance, and every kill is reported first, as the kill, by the launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chaos")  # the reference run is trained once, for both plans


def chaos(out: Path, plan: str, seed: int) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))
    }
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "scripts/chaos_train.py", "--out", str(out), "--plan", plan, "--seed", str(seed)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_three_kills_and_resumes_on_two_processes_end_with_the_uninterrupted_weights(out: Path) -> None:
    proc = chaos(out, "2,2,2,2", seed=11)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(",")[0] for line in lines if line.startswith("round")] == [
        "round 1: 2 process(es)",
        "round 2: 2 process(es)",
        "round 3: 2 process(es)",
        "round 4: 2 process(es)",
    ]
    assert sum("exit 137" in line for line in lines) == 3  # three kills, each reported as the cause
    # same topology: the resumed run is the uninterrupted one, bit for bit
    assert "max |w - w_ref| = 0 (tolerance 0.0001); first error lines name the killed process: True" in lines
    assert lines[-1] == "chaos: PASS"


@pytest.mark.xfail(
    reason="a resume on another number of processes continues the global sample stream only with the "
    "data-position work (each rank restarts from its own rank{r}.pt position today)",
    strict=False,
)
def test_a_resume_on_one_process_and_back_on_two_ends_with_the_uninterrupted_weights(out: Path) -> None:
    proc = chaos(out, "2,2,1,2", seed=12)
    lines = proc.stdout.splitlines()
    assert "round 3: 1 process(es)" in "\n".join(lines), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and lines[-1] == "chaos: PASS", proc.stdout[-3000:]
