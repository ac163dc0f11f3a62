"""The end of a process of a multi-process launch: bounded, and never left to the interpreter's teardown.

A run that has finished (checkpoint saved, exit status written for the launcher) must end. Two
steps after that have no timeout of their own:
- destroying the process groups (`destroy_process_group`: each backend's shutdown, then its
  destructor, which joins its worker threads);
- the interpreter's own teardown, which destroys what is still referenced (process groups held by
  the expert mesh, DDP's reducer, C++ thread pools) in no chosen order.
One such wait was seen in CI: a finished 2-process run (process 0 had destroyed its groups and
printed its last line, the checkpoint was complete) whose launcher waited for process 1 until the
test's 10-minute limit. Train workers already skipped the interpreter's teardown, so process 1 was
destroying its process groups.

`bounded_teardown` destroys them on a thread of its own and waits `TEARDOWN_S`: past that, it says
so with every thread's stack and the process goes on to end with its own exit code (what the run
saved is complete; the groups were only being cleaned up). A C watchdog (faulthandler) ends the
process with exit 1 if even that cannot go on (a destructor that holds the GIL). `leave` skips the
interpreter's teardown: flush what is buffered, end the run's helpers, `os._exit(code)`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

TEARDOWN_S = 30.0  # destroying the process groups takes milliseconds when nothing is wrong
BACKSTOP_S = 30.0  # after TEARDOWN_S: the waiting thread never got the GIL back


def launched_worker() -> bool:
    """This process is one of several started by a launcher (accelerate / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def teardown_deadline(seconds: float) -> Iterator[None]:
    """Past `seconds` inside, dump every thread's stack to stderr and exit 1."""
    armed, stderr = False, sys.__stderr__
    if stderr is not None:
        with contextlib.suppress(ValueError, OSError):  # no file behind standard error (a notebook)
            faulthandler.dump_traceback_later(seconds, exit=True, file=stderr)
            armed = True
    try:
        yield
    finally:
        if armed:
            faulthandler.cancel_dump_traceback_later()


def bounded_teardown(destroy: Callable[[], None], rank: int, seconds: float | None = None) -> bool:
    """Run `destroy` (the process groups' teardown) and wait at most `seconds` (default TEARDOWN_S)
    for it. False when it did not finish: then a warning and every thread's stack are on stderr, and
    the caller goes on without it. Its errors are raised here."""
    limit = TEARDOWN_S if seconds is None else seconds
    failed: list[BaseException] = []

    def run() -> None:
        try:
            destroy()
        except BaseException as e:  # raised on the caller's thread below
            failed.append(e)

    worker = threading.Thread(target=run, name="moe-lm process-group teardown", daemon=True)
    # Should the waiting thread itself never get the GIL back, the C watchdog ends the process.
    with teardown_deadline(limit + BACKSTOP_S):
        worker.start()
        worker.join(limit)
    if worker.is_alive():
        print(
            f"warning: process {rank}: destroying the process groups did not finish in {limit:g} s (a wait "
            "inside torch.distributed); what the run saved is complete: ending without it. Every thread:",
            file=sys.stderr,
            flush=True,
        )
        stderr = sys.__stderr__
        if stderr is not None:
            with contextlib.suppress(ValueError, OSError):  # no file behind it
                faulthandler.dump_traceback(file=stderr, all_threads=True)
        return False
    if failed:
        raise failed[0]
    return True


def leave(code: int) -> NoReturn:
    """End this process now with `code`, without the interpreter's teardown: standard streams and
    logging flushed, wandb's service and multiprocessing children ended (what the teardown would
    have done for this program), then `os._exit`. Everything the run wrote is closed by then (the
    trainer's sinks, checkpoints, the launcher's exit file)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        with contextlib.suppress(Exception):
            wandb.teardown()
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(timeout=5)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more can be said there
            stream.flush()
    os._exit(code)


__all__ = ["BACKSTOP_S", "TEARDOWN_S", "bounded_teardown", "launched_worker", "leave", "teardown_deadline"]
