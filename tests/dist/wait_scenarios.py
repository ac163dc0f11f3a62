"""What each process of a 2-process gloo group does in tests/dist/test_waits.py (run by the harness).

The scenarios run one after the other in the same two processes (starting processes is most of the
cost), each with its own `Waits` on its own part of the store, resynchronised by a gloo barrier."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from moe_lm.parallel.waits import Waits

TIMEOUT_S = 2.0


_OPEN: list[Waits] = []


def _join(name: str, dead_after_s: float = 15.0) -> Waits:
    store = dist.PrefixStore(f"{name}/", dist.distributed_c10d._get_default_store())
    _OPEN.append(Waits(dist.get_rank(), dist.get_world_size(), TIMEOUT_S, store, dead_after_s))
    return _OPEN[-1]


def many(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    # the group's own timeout stays long: scenarios are separated by barriers on it
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    results = {}
    names = (
        "late_peer",
        "failed_peer",
        "silent_peer",
        "progressing_peer",
        "timed_out_collective",
        "second_run",
    )
    for name in names:
        results[name] = globals()[name](rank, args)
        while _OPEN:
            _OPEN.pop().close()
        dist.barrier()
    return results


def _outcome(work: Any) -> dict[str, Any]:
    start = time.monotonic()
    try:
        work()
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def late_peer(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Process 1 is busy elsewhere (alive, beating) for longer than the timeout."""
    waits = _join("late_peer")
    waits.doing("evaluation after step 7")
    if rank == 1:
        time.sleep(TIMEOUT_S + 1.5)
        return {"error": None}
    return _outcome(lambda: waits.barrier("writing checkpoint step-8"))


def failed_peer(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Process 0 fails while process 1 waits for it: 1 stops at once, not at the timeout."""
    waits = _join("failed_peer")
    if rank == 0:
        waits.doing("preparing the token store")
        time.sleep(0.3)
        waits.announce_failure(OSError("Corrupt snappy compressed data"))
        time.sleep(2.0)  # stays alive: the failure, not a lost connection, must end the wait
        return {"error": None}
    return _outcome(lambda: waits.barrier("preparing the token store", idle=True))


def silent_peer(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Process 1 stops beating (as a killed process does) while 0 waits; the timeout is far off."""
    waits = _join("silent_peer", dead_after_s=1.5)
    waits.timeout_s = 60.0
    if rank == 1:
        waits.doing("training step 3")
        time.sleep(1.5)  # a heartbeat says so
        waits.close()  # and then no more
        time.sleep(4.0)
        return {"error": None}
    return _outcome(lambda: waits.barrier("writing checkpoint step-4"))


def progressing_peer(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """An idle-timeout barrier waits as long as the missing process makes progress, then no longer."""
    waits = _join("progressing_peer")
    if rank == 0:
        waits.doing("tokenising")
        end = time.monotonic() + 2.5 * TIMEOUT_S
        while time.monotonic() < end:  # longer than the timeout, with progress all along
            waits.progress()
            time.sleep(0.1)
        waits.barrier("preparing the token store", idle=True)
        waits.doing("stuck")
        time.sleep(TIMEOUT_S + 1.5)  # no progress and never arriving at the next one
        return {"error": None}
    first = _outcome(lambda: waits.barrier("preparing the token store", idle=True))
    second = _outcome(lambda: waits.barrier("preparing the validation store", idle=True))
    return {"first": first, "second": second}


def timed_out_collective(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """A collective past the process group's timeout, explained from the other process's heartbeat."""
    waits = _join("timed_out_collective")
    group = dist.new_group(timeout=timedelta(seconds=TIMEOUT_S))  # as the run's groups get parallel.timeout
    if rank == 1:
        waits.doing("callback Evaluate after step 5")
        time.sleep(2 * TIMEOUT_S)
        return {"error": None}
    waits.doing("training step 6")
    try:
        dist.all_reduce(torch.ones(2), group=group)
    except RuntimeError as e:
        explained = waits.explain(e)
        return {"raw": str(e), "type": type(explained).__name__, "message": str(explained)}
    return {"type": None}


def second_run(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Two runs, one after the other, in the same process group (as tests and notebooks do): the
    second run's barrier waits for the late process, though the first run's same barrier completed."""
    first = Waits.join(60.0)
    first.barrier("writing checkpoint step-2")
    first.close()
    dist.barrier()
    second = Waits.join(60.0)
    _OPEN.append(second)
    if rank == 1:
        time.sleep(1.0)
    return _outcome(lambda: second.barrier("writing checkpoint step-2"))
