"""`moe-lm` end to end without training: `info`, help, and one-line user errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lm.cli import main

REPO = Path(__file__).resolve().parents[2]
MIXTRAL = str(REPO / "configs" / "mixtral-8x7b.yaml")
TINY = str(REPO / "configs" / "tiny-shakespeare.yaml")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "moe_lm.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_info_json_mixtral(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", MIXTRAL, "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out)  # exactly one JSON object: anything else on stdout breaks this
    assert info["total_params"] == pytest.approx(46.7e9, rel=0.01)
    assert info["active_params"] == pytest.approx(12.9e9, rel=0.01)
    assert sum(info["components"].values()) == info["total_params"]
    assert info["config"]["model"]["num_experts"] == 8 and info["config"]["parallel"]["ep_size"] == 8
    assert info["train_flops_per_token"] == 6 * info["active_params"]


def test_info_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", TINY, "model.num_experts=16", "model.top_k=1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # tiny-shakespeare: 4 layers, hidden 128, intermediate 256 -> one expert = 3*128*256 = 98,304
    assert info["components"]["experts"] == 4 * 16 * 98_304
    assert info["components"]["router"] == 4 * 16 * 128
    assert info["total_params"] - info["active_params"] == 4 * 15 * 98_304
    assert info["config"]["model"]["top_k"] == 1


def test_info_human_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", MIXTRAL]) == 0
    out = capsys.readouterr().out
    assert "46.70B" in out and "46,702,792,704" in out and "12.88B" in out
    assert "experts" in out and "96.6%" in out  # 45.10B of 46.70B
    assert "num_experts: 8" in out  # the resolved config is printed as YAML


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([TINY, "model.num_expert=4"], "did you mean 'model.num_experts'"),
        ([TINY, "train.max_steps=lots"], "train.max_steps"),
        ([TINY, "model.top_k=9"], "model.top_k"),
        (["configs/does-not-exist.yaml"], "not found"),
        ([TINY, "train.max_steps"], "key.sub=value"),
        ([TINY, "--no-such-flag"], "unrecognized arguments"),
        ([], "config"),
    ],
)
def test_info_user_errors_are_one_line(args: list[str], expected: str) -> None:
    proc = _run("info", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and expected in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_help_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    script = Path(sys.executable).parent / "moe-lm"  # the installed console script, when there is one
    if script.exists():
        proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    else:
        proc = _run("--help")
    assert proc.returncode == 0 and "info" in proc.stdout and "train" in proc.stdout
    assert main(["info", "--help"]) == 0
    assert "--json" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown command 'frobnicate'")
    assert main([]) == 2  # no command: usage, and a non-zero exit for scripts


def test_python_dash_m_moe_lm_is_the_cli() -> None:
    """`accelerate launch -m moe_lm train ...` (accelerate's documented form) needs moe_lm/__main__.py."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "moe_lm", "info", TINY, "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["name"] == "tiny-shakespeare"


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """`moe-lm info CONFIG --json | head`: the reader closes the pipe before the write (it was a
    BrokenPipeError traceback)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moe_lm", "info", MIXTRAL, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the command prints (it imports torch first)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err  # as if killed by SIGPIPE, like any Unix tool
    assert err == ""


def test_ctrl_c_outside_training_is_one_line_and_exit_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in `moe-lm data prepare` (or any command outside the training loop). Was: a
    KeyboardInterrupt traceback through the tokenising pool's wait."""
    import moe_lm.cli as cli

    def interrupted(argv: list[str] | None = None) -> int:
        raise KeyboardInterrupt

    monkeypatch.delenv("MOE_LM_ERROR_DIR", raising=False)
    # Not a launched worker, whatever runs pytest: with WORLD_SIZE > 1, run() ends the process with
    # os._exit (moe_lm/parallel/teardown.py), and this one is pytest's: the session ended, exit 130.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "main", interrupted)
    try:
        with pytest.raises(SystemExit) as exited:
            cli.run()
    except KeyboardInterrupt:  # pytest would end the whole session on it
        pytest.fail("run() let KeyboardInterrupt through (a traceback)")
    assert exited.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "error: interrupted (SIGINT); what was complete is kept: run the same command again to continue"
    ]
