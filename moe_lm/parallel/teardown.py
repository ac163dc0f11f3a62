"""The end of a process of a multi-process launch: bounded, and never left to the interpreter's teardown.

A run that has finished (checkpoint saved, exit status written for the launcher) must end. Two
steps after that have no timeout of their own:
- destroying the process groups: gloo's and NCCL's destructors join their worker threads;
- the interpreter's own teardown, which destroys what is still referenced (process groups held by
  the expert mesh, DDP's reducer, C++ thread pools) in no chosen order; a destructor that joins a
  thread needing the GIL its caller holds waits forever.
One such wait was seen: a finished 2-process run (every line printed, its checkpoint complete) whose
launcher waited for a worker until the test's 10-minute limit.

`teardown_deadline` bounds the first: past `TEARDOWN_S`, every thread's stack goes to stderr and the
process exits 1 (faulthandler's watchdog is a C thread: it fires even while a destructor holds the
GIL). `leave` skips the second: flush what is buffered, end the run's helpers, `os._exit(code)`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

TEARDOWN_S = 60.0  # destroying the process groups takes milliseconds when nothing is wrong


def launched_worker() -> bool:
    """This process is one of several started by a launcher (accelerate / torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def teardown_deadline(seconds: float | None = None) -> Iterator[None]:
    """Past `seconds` (default TEARDOWN_S) inside, dump every thread's stack to stderr and exit 1."""
    armed, stderr = False, sys.__stderr__
    if stderr is not None:
        with contextlib.suppress(
            ValueError, OSError
        ):  # no file behind standard error (a service, a notebook)
            faulthandler.dump_traceback_later(
                TEARDOWN_S if seconds is None else seconds, exit=True, file=stderr
            )
            armed = True
    try:
        yield
    finally:
        if armed:
            faulthandler.cancel_dump_traceback_later()


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


__all__ = ["TEARDOWN_S", "launched_worker", "leave", "teardown_deadline"]
