"""Run slices of experts side by side, one intra-op thread each (CPU, the loop path).

With several threads, torch splits every op across all of them: each of the loop path's many small
per-expert GEMMs and elementwise passes then pays an OpenMP fork/join, and small GEMMs split in two
run well below twice the speed. Here the experts are cut into as many contiguous slices as torch has
threads, with about equal rows; each slice runs on its own thread with torch set to one thread
there, so no op inside forks and every GEMM runs at single-thread efficiency. This matters most
with many small experts (scripts/bench_peers.py, E64 top-8, 2 threads).

Slices hold whole experts, so each weight gradient is written by one thread; anything several slices
add into (the combined output, the input gradient) gets one buffer per slice, summed in slice order
at the end, so results do not depend on thread timing.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

G = TypeVar("G")
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    global _pool, _pool_size
    _pool, _pool_size = None, 0  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool)


def _one_thread() -> None:
    torch.set_num_threads(1)  # this worker's OpenMP and MKL thread count, for every later op


def _workers(n: int) -> concurrent.futures.ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            _pool = concurrent.futures.ThreadPoolExecutor(n, "moe-experts", initializer=_one_thread)
            _pool_size = n
        return _pool


def slices(rows: Sequence[int], can_cut: Sequence[bool], n: int) -> list[tuple[int, int]]:
    """Split items (groups of rows) into at most n contiguous [start, stop) ranges of about equal rows,
    cutting only before items where can_cut is true."""
    total = sum(rows)
    cuts, seen = [0], 0
    for i, r in enumerate(rows):
        target = total * len(cuts) / n
        if i > 0 and can_cut[i] and len(cuts) < n and seen >= target - r / 2:
            cuts.append(i)
        seen += r
    cuts.append(len(rows))
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def run_sliced(
    groups: Sequence[G], can_cut: Sequence[bool], rows: Sequence[int],
    part: Callable[[Sequence[G], torch.Tensor | None], None], make_acc: Callable[[], torch.Tensor | None],
) -> torch.Tensor | None:  # fmt: skip
    """part(groups[a:b], acc) for every slice, the slices on separate threads when torch has several;
    returns the sum of the slices' accumulators (each from make_acc(); may be None)."""
    threads = torch.get_num_threads()
    ranges = slices(rows, can_cut, threads) if threads > 1 else [(0, len(groups))]
    if len(ranges) <= 1:
        acc = make_acc()
        part(groups, acc)
        return acc
    accs = [make_acc() for _ in ranges]
    grad_mode = torch.is_grad_enabled()

    def run(i: int) -> None:
        with torch.set_grad_enabled(grad_mode):  # grad mode is per thread
            part(groups[ranges[i][0] : ranges[i][1]], accs[i])

    pool = _workers(len(ranges) - 1)
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(run, i) for i in range(1, len(ranges))]
        try:
            run(0)
        finally:
            concurrent.futures.wait(futures)  # no slice may still write when this returns
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(threads)
    total = accs[0]
    if total is not None:
        for acc in accs[1:]:
            total.add_(acc)  # type: ignore[arg-type]
    return total
