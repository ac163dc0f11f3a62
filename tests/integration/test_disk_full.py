"""A full disk (ENOSPC, injected with MOE_LM_FAULT) while writing a checkpoint, the token store or
metrics.jsonl: one line with the path, the bytes needed and free, the checkpoint that is intact
and `train.resume=auto` to continue; exit code 2; and the same command, once there is room,
finishes the run as if nothing had happened."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moe_lm.cli import main
from moe_lm.state.weights import load_model_state
from tests.integration.conftest import run_config_dict

STEPS = 4
FREE = r"it needs (\S+ \S+ \()?[0-9,]+ bytes\)? and (\S+ \S+ \()?[0-9,]+ bytes\)? are free"


@pytest.fixture(scope="module")
def make_run(corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("disk-full")

    def make(name: str, cache: str = "cache", **train: Any) -> Path:
        data = run_config_dict(
            corpus,
            tokenizer_dir,
            root / name,
            train={"max_steps": STEPS, "resume": "auto", **train},
            checkpoint={"every": 2, "keep_last": 2},
            logging={"peak_tflops": 1.0},
        )
        data["data"]["cache_dir"] = str(root / cache)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


def run_dir(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["train"]["output_dir"])


def train_records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(make_run) -> Path:
    cfg = make_run("reference")
    assert main(["train", str(cfg)]) == 0
    return run_dir(cfg)


def assert_same_as(run: Path, ref: Path) -> None:
    ours, theirs = train_records(run), train_records(ref)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]
    a, b = (load_model_state(r / "checkpoints" / f"step-{STEPS}") for r in (run, ref))
    assert all(torch.equal(a[k], b[k]) for k in b)


def fail_then_continue(cfg: Path, fault: str, monkeypatch, capsys) -> str:
    """The run under `fault`: exit 2 with one line (returned); then the same command without it."""
    monkeypatch.setenv("MOE_LM_FAULT", fault)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: disk full: "), err
    monkeypatch.delenv("MOE_LM_FAULT")
    assert main(["train", str(cfg)]) == 0  # once there is room: the same command
    return err.strip()


@pytest.mark.parametrize(("fault", "intact"), [("enospc_metrics:3", 2), ("enospc:4", 2)])
def test_a_full_disk_mid_run_is_one_line_and_the_same_command_continues(
    make_run, reference, monkeypatch, capsys, fault, intact
) -> None:
    cfg = make_run(fault.replace(":", "-"))
    run = run_dir(cfg)
    line = fail_then_continue(cfg, fault, monkeypatch, capsys)
    what = f"a metrics record to {run / 'metrics.jsonl'}" if "metrics" in fault else "checkpoint step-4 to"
    assert line.startswith(f"error: disk full: cannot write {what}")
    assert re.search(FREE, line), line
    assert f"checkpoint step-{intact} is intact" in line and line.endswith("continue with train.resume=auto")
    assert_same_as(run, reference)


def test_a_full_disk_writing_latest_says_the_checkpoint_was_saved(
    make_run, reference, monkeypatch, capsys
) -> None:
    """The checkpoint is complete when `latest` is written: the line says so, and the run continues from it."""
    cfg = make_run("enospc-latest")
    line = fail_then_continue(cfg, "enospc_latest:2", monkeypatch, capsys)
    assert line.startswith(f"error: disk full: cannot write `latest` in {run_dir(cfg) / 'checkpoints'}"), line
    assert "checkpoint step-2 was saved complete" in line and line.endswith("continue with train.resume=auto")
    assert_same_as(run_dir(cfg), reference)


def test_a_full_disk_while_preparing_the_token_store(make_run, tmp_path) -> None:
    """`moe-lm data prepare` and the first `moe-lm train` (subprocesses: the fault counts the shards
    a process writes) fail in one line naming the shard; nothing half-written stays; a rerun works."""
    cfg = make_run("store", cache="fresh-cache")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_LM_FAULT": "enospc_shard:1"}

    def moe_lm(*args: str, fault: bool = True) -> subprocess.CompletedProcess[str]:
        run_env = env if fault else {k: v for k, v in env.items() if k != "MOE_LM_FAULT"}
        cmd = [sys.executable, "-m", "moe_lm.cli", *args]
        return subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    shards = cfg.parent / "fresh-cache" / "store" / "shards"
    for args, ending in (
        (
            ["data", "prepare", str(cfg)],
            "the finished shards are kept: free space and run the same command again",
        ),
        (
            ["train", str(cfg)],
            f"no earlier checkpoint exists in {run_dir(cfg) / 'checkpoints'}: free space and "
            "continue with train.resume=auto",
        ),
    ):
        proc = moe_lm(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        err = proc.stderr.strip()
        assert err.count("\n") == 0 and err.startswith("error: disk full: cannot write token store shard "), (
            err
        )
        assert f" to {shards}: it needs at least " in err and err.endswith(ending), err
        assert not list(shards.glob("*.tmp-*")) and not list(shards.glob("*.json"))  # no shard looks complete
    assert moe_lm("train", str(cfg), fault=False).returncode == 0
