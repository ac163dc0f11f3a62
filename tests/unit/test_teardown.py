"""A process of a multi-process launch ends, with its own exit code, whatever its teardown would do
(moe_lm/parallel/teardown.py). Each case runs in a process of its own: what it tests is how that
process ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A non-daemon thread that never ends: the interpreter's teardown joins it, so a normal exit never comes.
HOLD = "import threading, time; threading.Thread(target=time.sleep, args=(10**6,)).start()\n"


def _python(code: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    # Without PYTHONUNBUFFERED (a CI image may set it): stdout to a pipe is block-buffered, as for a
    # worker whose output a launcher or `| tee` reads, so output left in its buffer is seen lost.
    dropped = ("WORLD_SIZE", "RANK", "PYTHONUNBUFFERED", "MOE_LM_ERROR_DIR")
    inherited = {k: v for k, v in os.environ.items() if k not in dropped}
    full = {**inherited, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_launched_worker_ends_with_its_exit_code_though_a_thread_would_hold_the_interpreter() -> None:
    # `moe-lm nosuchcommand` returns 2; what it printed before is flushed (stdout is a pipe: buffered).
    code = (
        HOLD
        + """
import sys
print("said before the end", end="")
sys.argv = ["moe-lm", "nosuchcommand"]
from moe_lm.cli import run
run()
"""
    )
    done = _python(code, env={"WORLD_SIZE": "2", "RANK": "1"})
    assert done.returncode == 2, done.stderr
    assert "said before the end" in done.stdout
    assert "unknown command 'nosuchcommand'" in done.stderr


def test_a_launched_worker_that_crashes_keeps_what_it_printed_and_its_report(tmp_path: Path) -> None:
    # Under `moe-lm launch` a crash is reported to the launcher (rank1.json, rank1.exit) and the
    # worker leaves with 1; run() flushes stdout only after a command returns, so what was printed
    # before the crash reaches the pipe through leave's flush alone.
    code = (
        HOLD
        + """
import sys
import moe_lm.cli as cli
print("said before the crash", end="")

def crashing_command():
    raise RuntimeError("boom")

cli.main = crashing_command
cli.run()
"""
    )
    done = _python(code, env={"WORLD_SIZE": "2", "RANK": "1", "MOE_LM_ERROR_DIR": str(tmp_path)})
    assert done.returncode == 1, done.stderr
    assert "said before the crash" in done.stdout
    assert (tmp_path / "rank1.exit").read_text() == "1\n"
    assert json.loads((tmp_path / "rank1.json").read_text())["line"] == "RuntimeError: boom"


def test_a_single_process_keeps_the_interpreters_exit() -> None:
    # Not launched (no WORLD_SIZE): atexit handlers run as in any Python program.
    code = """
import atexit, sys
atexit.register(lambda: print("atexit ran"))
sys.argv = ["moe-lm", "nosuchcommand"]
from moe_lm.cli import run
run()
"""
    done = _python(code)
    assert done.returncode == 2
    assert "atexit ran" in done.stdout


def test_a_teardown_that_never_returns_dumps_every_stack_and_exits() -> None:
    code = """
import time
from moe_lm.parallel.teardown import teardown_deadline

def stuck_in_a_destructor():
    time.sleep(60)

with teardown_deadline(0.5):
    stuck_in_a_destructor()
print("went on")
"""
    done = _python(code, timeout=30)
    assert done.returncode == 1
    assert "stuck_in_a_destructor" in done.stderr
    assert "went on" not in done.stdout


def test_a_teardown_that_returns_in_time_goes_on() -> None:
    code = """
import time
from moe_lm.parallel.teardown import teardown_deadline

with teardown_deadline(0.5):
    pass
time.sleep(1.0)  # past the deadline: it was cancelled
print("went on")
"""
    done = _python(code, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "went on" in done.stdout


# A process group of one, and an accelerator whose end_training (the groups' teardown) never returns.
_STUCK_LAYOUT = """
import time
import torch
import torch.distributed as dist
import moe_lm.parallel.teardown as teardown
from moe_lm.parallel.layout import Layout
from moe_lm.parallel.mesh import Mesh

dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)

class Accelerator:
    device = torch.device("cpu")

    def end_training(self):
        never_returns()

def never_returns():
    time.sleep(60)

teardown.TEARDOWN_S = 0.5
layout = Layout(accelerator=Accelerator(), mesh=Mesh(rank=0, world_size=1, ep_size=1, ep_group=None, edp_group=None))
"""


def test_a_process_group_teardown_that_never_returns_is_left_behind_with_its_stack(tmp_path: Path) -> None:
    code = (
        _STUCK_LAYOUT.format(store=tmp_path / "store")
        + """
layout.shutdown()
print("went on")
"""
    )
    done = _python(code, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "went on" in done.stdout
    assert "destroying the process groups did not finish in 0.5 s" in done.stderr
    assert "never_returns" in done.stderr


def test_a_failing_process_still_raises_its_error_when_the_teardown_hangs(tmp_path: Path) -> None:
    # shutdown() runs in a `finally` while the run's error propagates: that error must come out.
    code = (
        _STUCK_LAYOUT.format(store=tmp_path / "store")
        + """
try:
    raise RuntimeError("the run's own error")
finally:
    layout.shutdown()
"""
    )
    done = _python(code, timeout=30)
    assert done.returncode == 1
    assert "RuntimeError: the run's own error" in done.stderr


def test_a_teardown_that_fails_raises_its_error() -> None:
    code = """
from moe_lm.parallel.teardown import bounded_teardown

def destroy():
    raise ValueError("teardown failed")

bounded_teardown(destroy, rank=0, seconds=5)
"""
    done = _python(code, timeout=30)
    assert done.returncode == 1
    assert "ValueError: teardown failed" in done.stderr


def test_a_teardown_that_holds_the_interpreter_ends_the_process_with_its_stack() -> None:
    # libc's sleep called through PyDLL keeps the GIL: the waiting thread never runs again, and only
    # the C watchdog can end the process.
    code = """
import ctypes
import moe_lm.parallel.teardown as teardown

def holds_the_gil():
    ctypes.PyDLL(None).sleep(60)

teardown.BACKSTOP_S = 1.0
teardown.bounded_teardown(holds_the_gil, rank=0, seconds=0.5)
print("went on")
"""
    start = time.monotonic()
    done = _python(code, timeout=30)
    assert done.returncode == 1
    assert "holds_the_gil" in done.stderr
    assert "went on" not in done.stdout
    assert time.monotonic() - start < 20


def test_a_finished_launcher_ignores_a_stop_signal_that_arrives_as_it_exits() -> None:
    # The signal comes during the interpreter's teardown (an atexit handler sends it): a launcher whose
    # status is decided must exit with it, not die of the signal (a late third SIGTERM gave -15).
    code = """
import atexit, os, signal, sys, time

def late_signal():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)

atexit.register(late_signal)
sys.argv = ["moe-lm", "launch", "--help"]
from moe_lm.cli import run
run()
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
