"""`make gpu-check` (scripts/gpu_check.py) exercised on CPU: `--device cpu --smoke` runs every check
on a tiny model; the parser reads bench_train's GPU table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402

HANG_GUARD_S = 1800  # a hang guard: the smoke run takes about 20 s on 2 cores

GPU_BENCH_OUTPUT = """
## Train step (fwd + bwd + AdamW)

| model                | tokens/s | step ms | GFLOP/s | moe_lm speed-up | peak alloc MiB | moe_lm mem / this |
|----------------------|----------|---------|---------|-----------------|----------------|-------------------|
| moe_lm               |  412,345 |       5 |  98,765 |           1.00x |          1,234 |              1.00 |
| hf grouped_mm (best) |  300,000 |       7 |  70,000 |           1.37x |          2,000 |              0.62 |

moe_lm / best transformers (grouped_mm): 1.37x tokens/s, 0.62x peak memory
"""


def test_parse_bench_reads_the_moe_lm_row_by_column_name() -> None:
    got = gpu_check.parse_bench(GPU_BENCH_OUTPUT)
    assert got == {
        "tokens_per_s": 412345.0,
        "flops": 98765e9,
        "peak_mib": 1234.0,
        "vs": "1.37x transformers grouped_mm",
    }


def _rows(markdown: str) -> dict[str, list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in cells}


def test_smoke_run_on_cpu_passes_every_check(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # The script's 8-minute budget is for a GPU; a loaded CPU machine may need longer with no defect,
    # so the budget here is past the hang guard's timeout and only a failing check fails the test.
    cmd = [sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--smoke", "--out", str(tmp_path)]
    cmd += ["--budget", str(2 * HANG_GUARD_S)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu-check: all checks passed" in proc.stdout
    rows = _rows((tmp_path / "gpu_check.md").read_text())
    train = "train 6 steps, fp32, 0.1M params"
    plan = "plan of that run (ep1/ddp/mb4x1/noac, cpu)"
    assert list(rows) == [
        "tests/gpu",
        train,
        plan,
        "resume at 3 vs straight 6",
        "export fp32 -> transformers",
        "bench_train fp32",
        "bench_train fp32 --compile",
    ]
    assert re.fullmatch(r"\d+ passed, \d+ skipped", rows["tests/gpu"][3])  # the CPU halves; no CUDA here
    tokens_per_s, mfu, peak, result, _ = rows[train]
    assert float(tokens_per_s.replace(",", "")) > 0 and mfu.endswith("%") and peak == "-"
    assert result.startswith("val loss ")
    tokens_per_s, mfu, peak, result, status = rows[plan]  # on a CPU the plan predicts memory only
    assert (tokens_per_s, mfu, status) == ("-", "-", "ok") and float(peak.replace(",", "")) > 0
    assert result.startswith("predicted; peak during the ")
    assert rows["resume at 3 vs straight 6"][3] == "bit-exact"
    assert rows["export fp32 -> transformers"][3] == "max abs logit diff 0.0e+00"
    assert float(rows["bench_train fp32"][0].replace(",", "")) > 0
    assert rows["bench_train fp32"][3].endswith("x transformers eager")
    assert all(row[-1] == "ok" for row in rows.values())
    # docs/launching.md shows this table: the same checks, each cell as the script writes it (figures aside)
    shown = _rows(_smoke_table_in_the_docs())
    assert {k: list(map(_shape, v)) for k, v in shown.items()} == {
        k: list(map(_shape, v)) for k, v in rows.items()
    }


def _smoke_table_in_the_docs() -> str:
    text = (REPO / "docs" / "launching.md").read_text()
    tables = re.findall(r"^```\n(\| check .*?)^```", text, re.M | re.S)
    assert len(tables) == 1, "docs/launching.md shows one gpu_check table"
    return tables[0]


def _shape(cell: str) -> str:
    """A cell with its figures replaced: `val loss 5.955 -> 5.945` is `val loss N -> N`."""
    return re.sub(r"\d[\d,]*(\.\d+)?(e[+-]\d+)?", "N", cell)


def test_cuda_without_a_gpu_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: --device cuda but torch sees no CUDA device\n"
