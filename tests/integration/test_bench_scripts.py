"""Every benchmark docs/benchmarks.md quotes runs, at its smallest size: the script finishes, prints its
tables, and the numbers that must hold whatever the machine's speed do (parity with transformers and
the peers, positive times). Speed itself is not asserted; the benchmarks are what measure it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, f"scripts/{script}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def bench(script: str, *args: str) -> str:
    proc = run(script, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the markdown table after the first line containing `heading`, row by row."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    found = []
    for line in lines[start + 2 :]:  # below the header and the |---| line
        if not line.startswith("| "):
            break
        found.append([c.strip() for c in line.strip().strip("|").split("|")])
    return found


def table(text: str, heading: str) -> dict[str, list[str]]:
    """The same table as first cell -> the other cells."""
    return {row[0]: row[1:] for row in rows(text, heading)}


def number(cell: str) -> float:
    return float(re.sub(r"[*,x]|\(.*\)", "", cell))


def test_bench_peers_compares_like_for_like() -> None:
    out = bench("bench_peers.py", "--quick", "--no-memory", "--peers", "moe_lm,transformers eager")
    parity = table(out, "## Parity")
    (row,) = parity.values()
    d_out, d_grad = (float(v) for v in row[-1].split(" / "))  # transformers eager vs moe_lm
    assert d_out < 1e-5 and d_grad < 1e-4
    times = table(out, "wall time")
    (cells,) = times.values()
    assert all(number(c) > 0 for c in cells[2:5])  # dense, moe_lm, transformers eager


def test_bench_peers_refuses_an_unknown_candidate_in_one_line() -> None:
    proc = run("bench_peers.py", "--peers", "moe_lm,transformers")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --peers: unknown candidate 'transformers'")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_bench_train_matches_transformers_at_step_0() -> None:
    out = bench("bench_train.py", "--quick", "--no-memory", "--impls", "eager")
    parity = table(out, "## Step-0 parity")
    assert float(parity["hf eager"][1]) < 1e-4  # |diff| of the LM loss
    assert float(parity["hf eager"][3]) < 1e-5  # |diff| of the aux loss
    step = table(out, "## Train step")
    assert number(step["moe_lm"][1]) > 0 and "GEMM probe" in out


@pytest.mark.parametrize(
    ("script", "heading"),
    [
        ("bench_moe_layer.py", "| tokens"),
        ("bench_scaling.py", "## Step time vs number of experts"),
        ("bench_balance.py", "| micro-batch x accumulation"),
        ("bench_routing_metrics.py", "| metric work alone"),
    ],
)
def test_layer_and_routing_benchmarks_run(script: str, heading: str) -> None:
    found = rows(bench(script, "--quick"), heading)
    numbers = [number(cell) for row in found for cell in row[1:] if re.fullmatch(r"[\d.,]+", cell)]
    assert found and numbers and all(n > 0 for n in numbers)


def test_bench_data_measures_prepare_training_and_loader(tmp_path: Path) -> None:
    out = bench("bench_data.py", "--small-mb", "1", "--large-mb", "2", "--workdir", str(tmp_path))
    prepare = rows(out, "**prepare**")
    assert [(row[0], row[1]) for row in prepare] == [("1 MB", "1"), ("1 MB", "2"), ("2 MB", "2")]
    assert len(rows(out, "**training**")) == 2  # both corpora trained
    loader = table(out, "**loader**")
    assert set(loader) == {"one source", "mixture 3:1 of two"}


def test_bench_sft_times_both_steps_at_the_same_tokens(tmp_path: Path) -> None:
    out = bench("bench_sft.py", "--quick", "--workdir", str(tmp_path))
    steps = table(out, "## Step cost at the same tokens per step")
    pre, sft = steps["pretraining (blocks, causal)"], steps["instruction tuning (packed, document mask)"]
    assert pre[0] == sft[0] == "512"  # 4 rows of 128 tokens each
    assert pre[1] == "512" and 0 < int(sft[1]) < 512  # only the assistant's tokens are targets
    assert pre[3] == "1.00x" and number(sft[2]) > 0 and number(sft[4]) > 0


def test_bench_plan_times_a_plan_in_a_process_of_its_own() -> None:
    out = bench("bench_plan.py", "--quick")
    ((wall, rss, layouts, per_layout),) = rows(out, "## moe-lm plan")
    assert number(wall) > 0 and number(rss) > 0 and layouts == "1" and number(per_layout) > 0
    (row,) = rows(out, "| layout |")
    assert row[0] == "ep1/ddp/mb16x1/noac" and row[1] == "1+2" and row[3] == "True"
