"""What `moe-lm launch` shows when processes fail (moe_lm/cli/launch.py): the cause first, its exit
code, and the consequences only when no cause is known, labelled as such. Reports are what the
workers leave (moe_lm/errors.py); deaths by signal come from the launcher's exit statuses."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from moe_lm.cli.launch import failures, show
from moe_lm.errors import ERROR_DIR_ENV, PeerFailed, UserError, WaitTimeout, report

CRASH_TB = (
    'Traceback (most recent call last):\n  File "x.py", line 1\nOSError: Corrupt snappy compressed data.\n'
)


def leave(
    error_dir: Path, rank: int, kind: str, line: str, code: int, t: float, consequence: bool = False
) -> None:
    record = {
        "rank": rank,
        "kind": kind,
        "consequence": consequence,
        "line": line,
        "exit_code": code,
        "time": t,
    }
    record["traceback"] = CRASH_TB if kind == "crash" else ""
    (error_dir / f"rank{rank}.json").write_text(json.dumps(record))


def shown(error_dir: Path, exits: dict[int, tuple[int, float]], capsys: pytest.CaptureFixture[str]):
    code = show(failures(error_dir, exits))
    return code, capsys.readouterr().err.splitlines()


def test_a_crash_comes_first_and_its_peers_pointer_is_not_shown(tmp_path: Path, capsys) -> None:
    leave(tmp_path, 0, "crash", "OSError: Corrupt snappy compressed data.", 1, 100.0)
    leave(
        tmp_path, 1, "run", "error: process 0 failed during 'preparing the token store' (...)", 3, 100.1, True
    )
    code, lines = shown(tmp_path, {0: (1, 100.0), 1: (3, 100.0)}, capsys)
    assert code == 1
    assert lines[0] == (
        "error: process 0 crashed with OSError: Corrupt snappy compressed data. (exit code 1); its traceback follows"
    )
    assert lines[1] == "--- process 0 ---" and lines[-1] == "OSError: Corrupt snappy compressed data."
    assert not any("process 1" in line for line in lines)


def test_a_killed_process_comes_before_the_connection_errors_it_caused(tmp_path: Path, capsys) -> None:
    leave(
        tmp_path, 0, "run", "error: another process went away during 'training step 3' (...)", 3, 100.2, True
    )
    code, lines = shown(tmp_path, {0: (3, 100.0), 1: (-signal.SIGKILL, 100.0)}, capsys)
    assert code == 137
    assert lines == [
        "error: process 1 was killed by SIGKILL (exit code 137); if no one sent it, the kernel's out-of-memory "
        "killer did (see `dmesg`); continue with train.resume=auto"
    ]


def test_a_kill_seen_a_moment_after_an_unrecognised_crash_is_still_the_cause(tmp_path: Path, capsys) -> None:
    """The launcher dates a death when it notices it (torchrun polls): it wins a near tie."""
    leave(tmp_path, 0, "crash", "RuntimeError: something gloo never said before", 1, 100.6)
    code, lines = shown(tmp_path, {0: (1, 101.0), 1: (-signal.SIGSEGV, 101.0)}, capsys)
    assert code == 128 + 11 and lines[0].startswith("error: process 1 was killed by SIGSEGV (exit code 139)")


def test_the_launchers_own_sigterm_to_the_survivors_is_never_the_cause(tmp_path: Path, capsys) -> None:
    leave(tmp_path, 1, "user", "error: data.train_files: file 'nope.txt' not found", 2, 100.0)
    code, lines = shown(tmp_path, {0: (-signal.SIGTERM, 100.0), 1: (2, 100.0)}, capsys)
    assert (code, lines) == (2, ["error: data.train_files: file 'nope.txt' not found"])


def test_a_kill_long_after_the_first_failure_is_the_launchers_escalation(tmp_path: Path, capsys) -> None:
    """torchrun SIGKILLs survivors that ignore its SIGTERM for 30 s: the first failure stays the cause."""
    leave(
        tmp_path,
        0,
        "run",
        "error: process 0 timed out after 10 s (parallel.timeout) in a collective",
        3,
        100.0,
    )
    code, lines = shown(tmp_path, {0: (3, 100.0), 1: (-signal.SIGKILL, 131.0)}, capsys)
    assert (code, lines) == (3, ["error: process 0 timed out after 10 s (parallel.timeout) in a collective"])


def test_with_only_consequences_they_are_shown_and_labelled(tmp_path: Path, capsys) -> None:
    leave(tmp_path, 0, "run", "error: another process went away during 'training step 3'", 3, 100.0, True)
    leave(tmp_path, 1, "run", "error: process 0 failed during 'training step 3' (...)", 3, 100.0, True)
    code, lines = shown(tmp_path, {0: (3, 100.0), 1: (3, 100.0)}, capsys)
    assert code == 3
    assert lines == [
        "error: the processes stopped but the one that failed first left no error; what the others saw "
        "(consequences, not the cause):",
        "  process 0 (a consequence): another process went away during 'training step 3'",
        "  process 1 (a consequence): process 0 failed during 'training step 3' (...)",
    ]


def test_a_job_stopped_from_outside_says_so(tmp_path: Path, capsys) -> None:
    code, lines = shown(tmp_path, {0: (-signal.SIGTERM, 100.0), 1: (-signal.SIGTERM, 100.0)}, capsys)
    assert (code, lines) == (143, ["error: process 0 was killed by SIGTERM (exit code 143)"])


def test_the_same_user_error_on_every_rank_is_shown_once(tmp_path: Path, capsys) -> None:
    for rank in (0, 1):
        leave(
            tmp_path,
            rank,
            "user",
            "error: model.vocab_size = 100 is smaller than the tokenizer's 384",
            2,
            100.0,
        )
    code, lines = shown(tmp_path, {0: (2, 100.0), 1: (2, 100.0)}, capsys)
    assert (code, lines) == (2, ["error: model.vocab_size = 100 is smaller than the tokenizer's 384"])


@pytest.mark.parametrize(
    ("error", "kind", "code", "consequence"),
    [
        (UserError("bad"), "user", 2, False),
        (WaitTimeout("late"), "run", 3, False),
        (PeerFailed("process 0 failed"), "run", 3, True),
    ],
)
def test_a_worker_under_the_launcher_leaves_a_report_instead_of_printing(
    tmp_path: Path, monkeypatch, capsys, error, kind, code, consequence
) -> None:
    monkeypatch.setenv(ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    assert report(error) == code
    assert capsys.readouterr().err == ""
    record = json.loads((tmp_path / "rank3.json").read_text())
    assert (record["kind"], record["exit_code"], record["consequence"]) == (kind, code, consequence)
    assert record["line"] == f"error: {error}" and record["rank"] == 3


def test_a_peers_failed_checkpoint_write_is_reported_as_a_consequence(tmp_path: Path, monkeypatch) -> None:
    """The rank that only saw another fail to write a checkpoint: one line, marked a consequence (it
    was a traceback, shown as a crash next to the real one)."""
    from moe_lm.parallel.waits import Waits
    from moe_lm.state.write_errors import PeerWriteError

    peer = PeerWriteError(
        "process 1 failed while writing checkpoint step-4 in runs/x/checkpoints (KeyError: 'w')"
    )
    explained = Waits(0, 1, 10.0).explain(peer)
    assert isinstance(explained, PeerFailed) and str(explained) == str(peer)
    assert Waits(0, 1, 10.0).explain(KeyError("w")) is None  # this process's own crash keeps its traceback
    monkeypatch.setenv(ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    assert report(explained) == 3
    assert json.loads((tmp_path / "rank0.json").read_text())["consequence"] is True
