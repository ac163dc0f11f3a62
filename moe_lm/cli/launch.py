"""`moe-lm launch [accelerate launch options] COMMAND ...`: accelerate's launcher, with our error contract.

`accelerate launch ... -m moe_lm train CONFIG` works, but accelerate turns any failing worker into
its own report: the simple launcher raises `CalledProcessError` (a traceback; `--quiet` swaps it
for a bare exit 1), and the torchrun launcher (multi-process, DeepSpeed) logs each worker's exit
and raises `ChildFailedError` whatever `--quiet` says. Either way the exit code is 1, and an
accelerate config file cannot change that (it has no `quiet` key). Nothing in the launching
process runs our code, so nothing a worker does can make that process exit 2 quietly.

This command runs accelerate's own launch code (same options, same config files) in-process and
keeps the contract of every other `moe-lm` command:
- the config is loaded and checked here first, so a bad key or value is one line before any
  worker starts;
- workers leave a report of how they failed in `MOE_LM_ERROR_DIR` (moe_lm/errors.py) instead of
  printing it: a user error (one line, exit 2), a run error (one line, exit 3: a dead worker, a
  wait past parallel.timeout) or a crash (its traceback, exit 1), each marked when it is only a
  consequence of another process's failure (a peer's "connection closed", "process 0 failed").
  A process killed by a signal leaves none; its exit status says so.
- when a run fails, this process prints the cause once, first: the failing process's own error,
  or which process was killed by which signal. The consequences are not shown; when no cause is
  known they are, labelled as consequences. The exit code is the cause's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_lm.errors import ERROR_DIR_ENV, UserError
from moe_lm.libraries import configure_deepspeed

USAGE = (
    "usage: moe-lm launch [accelerate launch options] COMMAND [ARGS...]\n"
    "  e.g. moe-lm launch --config_file configs/accelerate/cpu-2proc.yaml train configs/tiny-shakespeare.yaml "
    "parallel.ep_size=2\n"
    "Takes every option of `accelerate launch` (see `accelerate launch --help`) and runs `moe-lm COMMAND`\n"
    "in each process; a user error is one line on stderr and exit code 2, as for any moe-lm command."
)


def split_argv(argv: list[str], commands: set[str]) -> tuple[list[str], list[str]]:
    """(accelerate options, the moe-lm command and its arguments): split at the first command name."""
    for i, arg in enumerate(argv):
        if arg in commands:
            return argv[:i], argv[i:]
    raise UserError(
        "moe-lm launch: no command to run; put it after accelerate's options, e.g. "
        "`moe-lm launch --config_file configs/accelerate/cpu-2proc.yaml train CONFIG`"
    )


def preflight(command: list[str]) -> None:
    """What the launching process can check without starting workers: the train command's config."""
    if command[0] != "train":
        return
    from moe_lm.cli.train import train_parser
    from moe_lm.config import load_config

    args = train_parser().parse_args(command[1:])
    load_config(args.config, args.overrides)


def accelerate_args(options: list[str], command: list[str]) -> Any:
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()

    def error(message: str) -> None:  # argparse prints usage and exits; we keep to one line
        raise UserError(f"moe-lm launch: {message} (the options are accelerate launch's)")

    parser.error = error  # type: ignore[method-assign,assignment]
    for i, option in enumerate(options):
        if option == "--config_file" and i + 1 < len(options) and not Path(options[i + 1]).is_file():
            raise UserError(f"moe-lm launch: --config_file '{options[i + 1]}' not found")
    return parser.parse_args([*options, "-m", "moe_lm", *command])


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


# Signals a whole job receives from outside (a scheduler, Ctrl-C) or that the launcher sends to the
# survivors once one process has failed: on their own they say little about the cause.
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


@dataclass(frozen=True)
class Failure:
    """How one process ended, from its report (moe_lm/errors.py) or, without one, its exit status."""

    rank: int
    kind: str  # "user" | "run" | "crash" (a report), "signal" | "exit" (no report)
    consequence: bool  # it only stopped because another process failed first
    line: str  # the one line to show ("error: ...")
    exit_code: int  # as the shell reports it
    time: float  # when it failed (a report's own clock; for a death, when the launcher saw it)
    traceback: str = ""
    signal: int = 0


def _signal_name(number: int) -> str:
    return signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"


def failures(error_dir: Path, exits: dict[int, tuple[int, float]]) -> list[Failure]:
    """Every failed process: its report if it left one, else what its exit status says.
    `exits`: rank -> (exit status as subprocess gives it, negative for a signal; when seen)."""
    found: dict[int, Failure] = {}
    for path in error_dir.glob("rank*.json"):
        r = json.loads(path.read_text())
        found[r["rank"]] = Failure(
            r["rank"], r["kind"], r["consequence"], r["line"], r["exit_code"], r["time"], r["traceback"]
        )
    for rank, (code, seen) in exits.items():
        if rank in found or code == 0:
            continue
        if code < 0:
            name = _signal_name(-code)
            line = f"error: process {rank} was killed by {name} (exit code {_exit_code(code)})"
            if -code == signal.SIGKILL:
                line += (
                    "; if no one sent it, the kernel's out-of-memory killer did (see `dmesg`); "
                    "continue with train.resume=auto"
                )
            found[rank] = Failure(rank, "signal", False, line, _exit_code(code), seen, signal=-code)
        else:
            line = f"error: process {rank} exited with code {code} without saying why"
            found[rank] = Failure(rank, "exit", False, line, code, seen)
    return sorted(found.values(), key=lambda f: f.rank)


def the_cause(failed: list[Failure]) -> Failure | None:
    """The process whose failure made the others stop; None when only consequences are known.

    A report or a hard death (SIGKILL, SIGSEGV, ...) is a cause, the earliest first; a death by
    a signal from outside (SIGTERM, ...) only when nothing else failed, since the launcher itself
    sends SIGTERM to the survivors of a failure. A killed process is dated by when the launcher
    saw it, up to a second late, so it wins a near tie with a report."""
    hard = [f for f in failed if not f.consequence and (f.kind != "signal" or f.signal not in _STOP_SIGNALS)]
    if hard:
        return min(hard, key=lambda f: (f.time - (2.0 if f.kind == "signal" else 0.0), f.rank))
    soft = [f for f in failed if f.kind == "signal"]
    return min(soft, key=lambda f: (f.time, f.rank)) if soft else None


def show(failed: list[Failure]) -> int:
    """Print the cause first (suppressing what the others saw because of it); returns the exit code."""
    cause = the_cause(failed)
    if cause is None:
        print(
            "error: the processes stopped but the one that failed first left no error; "
            "what the others saw (consequences, not the cause):",
            file=sys.stderr,
        )
        for f in failed:
            print(f"  process {f.rank} (a consequence): {f.line.removeprefix('error: ')}", file=sys.stderr)
        return failed[0].exit_code if failed else 1
    if cause.kind == "crash":
        print(
            f"error: process {cause.rank} crashed with {cause.line} (exit code {cause.exit_code}); "
            "its traceback follows",
            file=sys.stderr,
        )
        print(f"--- process {cause.rank} ---\n{cause.traceback.rstrip()}", file=sys.stderr)
    else:
        print(cause.line, file=sys.stderr)
    return cause.exit_code


class LaunchStopped(Exception):
    """A stop signal reached the launcher before any process had started: nothing to pass it to."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def passing_on_stop_signals() -> Iterator[list[int]]:
    """While accelerate runs the processes: SIGTERM, SIGINT and SIGHUP to this process are passed on
    to its children, and this process waits for them (a training run saves a checkpoint at its next
    step boundary and exits 0). Yields the signals received.

    accelerate's single-process launcher does not catch them: this process died at once (exit 143,
    no line) and left its worker training with no one to report it. torchrun installs its own
    handlers once it starts its workers (it passes the signal on, waits, then raises
    SignalException: see `stopped`). A signal before any child exists stops the launch."""
    received: list[int] = []
    # Ctrl-C in a terminal reaches the whole foreground group, the single-process worker included:
    # passing it on would make it two (harmless to the trainer, not to a KeyboardInterrupt handler).
    try:
        in_foreground = os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):  # no terminal (or no stdin at all)
        in_foreground = False

    import psutil  # accelerate's dependency; imported now, so a signal is passed on at once

    def handle(signum: int, frame: Any) -> None:
        children = psutil.Process().children()
        if not children:
            raise LaunchStopped(signum)
        # Once per signal: the trainer restores the default handlers when it ends, so a late second
        # SIGTERM would kill a process that has just saved its checkpoint.
        already = signum in received
        received.append(signum)
        if already or (signum == signal.SIGINT and in_foreground):
            return
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.send_signal(signum)

    previous = {s: signal.signal(s, handle) for s in _STOP_SIGNALS}
    try:
        yield received
    finally:
        # Stopped (a signal passed on, or torchrun's SignalException): the launcher only reports
        # from here on, and every worker already has its signal. Restoring the default
        # handlers left a window before `outlive_workers` ignores them: a third SIGTERM 50 ms after
        # the second killed the launcher (exit -15) after it had said every process ended cleanly.
        from torch.distributed.elastic.multiprocessing.api import SignalException

        ending = bool(received) or isinstance(sys.exc_info()[1], SignalException)
        for s, handler in previous.items():
            signal.signal(s, _ignore if ending else handler)


def _ignore(signum: int, frame: Any) -> None:
    """A stop signal to a launcher that is already stopping: its workers have theirs."""


def stopped(signum: int, error_dir: Path, processes: int) -> int:
    """The launcher was stopped by `signum` and has passed it on: say how the processes ended, in one
    line. 0 when every one ended by itself with 0 (a training run saved a checkpoint first); the
    cause's code when one failed; 128 + signum when some were killed before they could stop."""
    failed = failures(error_dir, {})
    if failed:
        return show(failed)
    name = _signal_name(signum)
    clean = sum(1 for p in error_dir.glob("rank*.exit") if p.read_text().strip() == "0")
    if clean >= processes:
        print(
            f"moe-lm launch: stopped by {name}; every process ended cleanly (a training run saves a "
            "checkpoint at the step it stops: continue with train.resume=auto)",
            file=sys.stderr,
        )
        return 0
    print(
        f"error: moe-lm launch was stopped by {name}; {processes - clean} of {processes} process(es) "
        "ended without stopping cleanly (stopped before training began, or killed after the grace "
        "period); the newest complete checkpoint is intact: continue with train.resume=auto",
        file=sys.stderr,
    )
    return 128 + signum


def outlive_workers(grace_s: float = 30.0) -> None:
    """After torchrun's SignalException: wait until this launcher's workers have ended, as long as
    torchrun's grace (then kill them, as it does). torchrun waits for them itself, but its handler
    stays installed meanwhile and a second signal (SIGTERM twice, `docker stop` after `kill`)
    raised out of that wait: the launcher reported every process as killed (exit 143) while they
    were still saving their checkpoint, and left them running. Further stop signals are ignored
    from the moment the stop left torchrun (`passing_on_stop_signals`): every worker has one."""
    import psutil

    workers = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if "RANK" in child.environ():  # not a helper such as multiprocessing's resource tracker
                workers.append(child)
    _, alive = psutil.wait_procs(workers, timeout=grace_s)
    for worker in alive:
        with contextlib.suppress(psutil.Error):
            worker.kill()
    psutil.wait_procs(alive, timeout=5)


def _local_processes(args: Any) -> int:
    """How many processes this launcher starts (accelerate's num_processes counts every machine's)."""
    total = int(getattr(args, "num_processes", None) or 1)
    return max(1, total // int(getattr(args, "num_machines", None) or 1))


def launch_main(argv: list[str]) -> int:
    from moe_lm.cli import COMMANDS

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    options, command = split_argv(argv, set(COMMANDS) - {"launch"})
    args = accelerate_args(options, command)
    preflight(command)
    # torchrun's agent logs every worker's exit and closing signal; the workers and this command say
    # what matters. Exceptions it raises still reach us.
    # What they say is logged by each module's own logger, whose level torch sets: quiet them all.
    import torch.distributed.elastic.agent.server.api  # noqa: F401  (creates the agent's loggers)
    import torch.distributed.elastic.multiprocessing.api  # noqa: F401

    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # accelerate's --quiet turns a failed single process into a bare exit 1 (no exit status to
    # report); this command prints the one line itself in every case.
    args.quiet = False
    configure_deepspeed()  # accelerate's DeepSpeed launcher imports it; the workers inherit the settings
    from accelerate.commands.launch import launch_command
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    error_dir = Path(tempfile.mkdtemp(prefix="moe-lm-launch-"))
    os.environ[ERROR_DIR_ENV] = str(error_dir)  # the workers inherit it
    try:
        with passing_on_stop_signals() as received:
            launch_command(args)
        if received:  # the single-process launcher, after passing a signal on
            return stopped(received[0], error_dir, 1)
        return 0
    except subprocess.CalledProcessError as e:  # the single-process launcher
        return show(failures(error_dir, {0: (e.returncode, time.time())}))
    except ChildFailedError as e:  # torchrun's: several processes, DeepSpeed
        exits = {rank: (int(f.exitcode), float(f.timestamp)) for rank, f in e.failures.items()}
        return show(failures(error_dir, exits))
    except SignalException as e:  # torchrun's, stopped: it passed the signal on and waited
        outlive_workers()
        return stopped(int(e.sigval), error_dir, _local_processes(args))
    except LaunchStopped as e:
        print(
            f"error: moe-lm launch was stopped by {_signal_name(e.signum)} before any process started",
            file=sys.stderr,
        )
        return 128 + e.signum
    except ValueError as e:  # accelerate's own checks of its options, before any worker starts
        raise UserError(f"moe-lm launch: {str(e).splitlines()[0]}") from None
    finally:
        os.environ.pop(ERROR_DIR_ENV, None)
        shutil.rmtree(error_dir, ignore_errors=True)
