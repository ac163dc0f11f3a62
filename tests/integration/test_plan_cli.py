"""`moe-lm plan` end to end: the report, --json, bad input as one line and exit 2, and the check a
GPU run makes before step 1 (moe_lm/plan/preflight.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from moe_lm.cli import main
from moe_lm.config import load_config
from moe_lm.plan import preflight
from moe_lm.plan.gpus import parse_gpu
from tests.integration.conftest import REPO

TINY = str(REPO / "configs" / "tiny-shakespeare.yaml")
MIXTRAL = str(REPO / "configs" / "mixtral-8x7b.yaml")


def test_plan_reports_each_layout_and_recommends_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", TINY, "--gpus", "1", "--layouts", "config,ac"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"plan: {TINY} on 1 x h100-80gb (1 node of 1), routing balanced"
    rows = [line.split() for line in lines if line.startswith("  ep1/")]
    assert [row[0] for row in rows] == ["ep1/ddp/mb16x1/noac", "ep1/ddp/mb16x1/ac"]
    assert all(row[2] == "yes" for row in rows)
    assert "recommended: ep1/ddp/mb16x1/noac, the fastest layout that fits" in out  # no recomputation
    assert (
        f"  moe-lm train {TINY} parallel.ep_size=1 parallel.backend=ddp parallel.zero_stage=0 "
        "train.micro_batch_size=16 train.grad_accum_steps=1 train.activation_checkpointing=false"
    ) in lines
    assert "  experts: grouped_mm; attention: flash attention" in lines


def test_plan_json_is_one_object_on_stdout() -> None:
    # In a process of its own: importing DeepSpeed (a ZeRO layout) must not print onto the JSON.
    cmd = [sys.executable, "-m", "moe_lm", "plan", TINY, "--gpus", "1", "--json", "--gpu", "a100-40gb"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [*cmd, "--layouts", "config,zero2"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert [layout["layout"] for layout in plan["layouts"]] == [
        "ep1/ddp/mb16x1/noac",
        "ep1/zero2/mb16x1/noac",
    ]
    assert (
        plan["recommended"] == "ep1/zero2/mb16x1/noac"
    )  # bf16 weights: less to move than fp32 under autocast
    assert plan["gpu"]["name"] == "a100-40gb" and plan["usable_bytes"] == int(40 * 1024**3 * 0.9)
    layout = plan["layouts"][0]
    assert layout["fits"] and layout["peak_bytes"] == sum(layout["memory"].values())
    assert layout["step"]["tokens_per_s"] > 0 and 0 < layout["step"]["mfu"] < 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--gpu", "x100"],
            "error: --gpu: unknown GPU kind 'x100'; use one of h100-80gb, h200-141gb, a100-80gb",
        ),
        (
            ["--layouts", "ep3"],
            "error: layout ep3/zero2/mb1x8/ac: ep_size 3 must divide both the 8 experts and the 16 GPUs",
        ),
        (
            ["--gpus", "12"],
            "error: --gpus 12 is not a multiple of --gpus-per-node 8: nodes are filled whole; use 8 or 16",
        ),
        (
            ["--gpus", "4", "--gpus-per-node", "4"],
            "error: layout ep8/zero2/mb1x8/ac: ep_size 8 must divide both the 8 experts and the 4 GPUs",
        ),
        (["--imbalance", "0.5"], "error: --imbalance 0.5 is outside [1, 8]"),
        (
            ["--gpu", "custom:memory_gib=inf"],
            "error: --gpu: memory_gib must be a positive finite number, got inf",
        ),
        (
            ["--gpu", "custom:tflops=nan"],
            "error: --gpu: tflops must be a positive finite number, got nan",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", MIXTRAL, *(["--gpus", "16"] if "--gpus" not in args else []), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and err.count("\n") == 1


def test_a_grouped_gemm_config_without_bf16_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # torch._grouped_mm takes bf16 only: the rehearsal (and the run) stopped in a RuntimeError traceback
    overrides = ["model.experts_impl=grouped_mm", 'train.mixed_precision="no"']
    assert main(["plan", TINY, *overrides, "--gpus", "1", "--layouts", "config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "error: model.experts_impl=grouped_mm needs bf16, but train.mixed_precision=no runs in"
    )


def test_a_config_that_fits_no_layout_says_what_comes_closest(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", TINY, "--gpus", "1", "--layouts", "config,ac", "--gpu", "custom:memory_gib=0.05"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "no layout fits; the closest:" in captured.out
    err = captured.err
    assert err.count("\n") == 1
    assert err.startswith(
        "error: no layout fits 1 x custom: the closest, ep1/ddp/mb16x1/ac, needs 110.2 MiB per GPU, 64.1 MiB over "
        "the 46.1 MiB usable; add GPUs, raise ep_size"
    )


def test_a_gpu_run_that_does_not_fit_warns_before_step_1(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(TINY)
    message = preflight.check_with_plan(cfg, 1, 8, parse_gpu("custom:memory_gib=0.05"))
    assert message is not None and "\n" not in message
    assert message.startswith(
        "warning: the plan of this run (ep1/ddp/mb16x1/noac on 1 GPU) needs 160.8 MiB per GPU"
    )
    assert message.endswith("see `moe-lm plan CONFIG --gpus 1` for a layout that fits")
    assert capsys.readouterr().err == message + "\n"
    assert preflight.check_with_plan(cfg, 1, 8, parse_gpu("h100-80gb")) is None


def test_moe_lm_train_runs_the_plan_check_on_gpus_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_lm.cli import train as train_cli

    calls: list[Any] = []
    monkeypatch.setattr(preflight, "check_gpu_run", lambda cfg: calls.append(cfg.name))
    cfg = load_config(TINY)
    train_cli.preflight(cfg)
    assert calls == ([] if not torch.cuda.is_available() else ["tiny-shakespeare"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train_cli.preflight(cfg)
    assert calls[-1] == "tiny-shakespeare"
