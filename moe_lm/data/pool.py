"""Worker processes that tokenise shards, where a worker that dies is an error, never a hang.

`multiprocessing.Pool` replaces a worker that dies (the out-of-memory killer's SIGKILL) and never
hands back the job it held, so its caller waits forever. Here every worker has its own pair of
pipes: it is sent one job at a time and answers with progress and the shard's manifest, and its
process sentinel says when it died. A dead worker stops the handing out of jobs; the jobs other
workers hold are finished (their shards are complete and kept), then one line names the input the
dead worker was tokenising. Its half-written files have temporary names and no manifest, so the
store stays consistent and a rerun tokenises only what is missing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from moe_lm.data.files import FilePiece
from moe_lm.data.store import ShardJob, token_dtype, write_shard
from moe_lm.errors import RunError


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as its cause."""

    def __str__(self) -> str:
        return str(self.args[0])


def describe(job: ShardJob) -> str:
    """The input a job tokenises, for messages: a file (and its byte range when cut) or a dataset."""
    piece = job.piece
    if isinstance(piece, FilePiece):
        whole = piece.start == 0 and piece.last and piece.row_groups is None
        return f"'{piece.path}'" + ("" if whole else f" (bytes {piece.start:,}-{piece.end:,})")
    return f"dataset '{piece.spec.dataset}' rows {piece.start:,}-{piece.end:,}"


def _work(jobs: Connection, results: Connection, model_bytes: bytes, vocab_size: int) -> None:
    """A worker: tokenise the jobs it is sent until it is sent None."""
    from moe_lm.data.tokenizer import Tokenizer

    tokenizer, dtype = Tokenizer(model_bytes), token_dtype(vocab_size)
    while True:
        try:
            job = jobs.recv()
        except EOFError:  # the main process is gone
            return
        if job is None:
            return
        try:
            manifest = write_shard(job, tokenizer, dtype, lambda b, t: results.send(("progress", b, t)))
        except Exception as e:
            remote = traceback.format_exc()
            try:
                results.send(("error", e, remote))
            except Exception:  # the exception does not pickle: its text does
                results.send(("error", RuntimeError(f"{type(e).__name__}: {e}"), remote))
            return
        results.send(("done", job.name, manifest))


@dataclass
class _Worker:
    process: Any  # multiprocessing's SpawnProcess
    jobs: Connection
    results: Connection
    job: ShardJob | None = None


def tokenise_in_workers(
    jobs: list[ShardJob],
    model_bytes: bytes,
    vocab_size: int,
    num_workers: int,
    progress: Callable[[int, int], None],
    heartbeat: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """{shard name: manifest} for `jobs`, tokenised by `num_workers` processes. `progress(bytes,
    tokens)` as they go; `heartbeat()` about twice a second. Raises RunError when a worker dies,
    and a worker's own exception (with its traceback as the cause) when one fails."""
    # spawn, not fork: the caller may be a training process with threads (OpenMP, gloo) running.
    ctx = multiprocessing.get_context("spawn")
    workers: list[_Worker] = []
    for _ in range(min(num_workers, len(jobs))):
        job_out, job_in = ctx.Pipe(duplex=False)
        result_out, result_in = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_work, args=(job_out, result_in, model_bytes, vocab_size), daemon=True)
        process.start()
        job_out.close()  # the worker's ends: closed here, so a dead worker reads as end of file
        result_in.close()
        workers.append(_Worker(process, job_in, result_out))
    pending = deque(jobs)
    done: dict[str, dict[str, Any]] = {}
    died: list[tuple[_Worker, ShardJob]] = []
    failed: list[tuple[BaseException, str]] = []

    def hand_out(w: _Worker) -> None:
        w.job = None
        if pending and not (died or failed) and w.process.exitcode is None:
            w.job = pending.popleft()
            with contextlib.suppress(OSError):  # it died this instant: its sentinel reports it, with this job
                w.jobs.send(w.job)

    try:
        for w in workers:
            hand_out(w)
        while busy := [w for w in workers if w.job is not None]:
            wait([w.results for w in busy] + [w.process.sentinel for w in busy], timeout=0.5)
            for w in busy:
                _drain(w, done, failed, progress)
                if w.job is not None and w.process.exitcode is not None:  # died holding a job
                    died.append((w, w.job))
                    w.job = None
                elif w.job is None:
                    hand_out(w)
            if heartbeat is not None:
                heartbeat()
    finally:
        for w in workers:
            _stop(w)
    if died:
        raise _died_error(died, len(done), len(jobs))
    if failed:
        error, remote = failed[0]
        raise error from RemoteTraceback(remote)
    if pending:  # every worker exited between jobs (none died holding one)
        raise RunError(
            f"the tokenising workers exited with {len(pending)} shard(s) left; run the same command again"
        )
    return done


def _drain(
    w: _Worker,
    done: dict[str, dict[str, Any]],
    failed: list[tuple[BaseException, str]],
    progress: Callable[[int, int], None],
) -> None:
    """Read what `w` has sent; it may have finished its job just before it died."""
    try:
        while w.results.poll():
            kind, *rest = w.results.recv()
            if kind == "progress":
                progress(*rest)
            elif kind == "done":
                done[rest[0]] = rest[1]
                w.job = None
            else:
                failed.append((rest[0], rest[1]))
                w.job = None
    except (EOFError, OSError):  # the worker is gone; its sentinel says so
        pass


def _stop(w: _Worker) -> None:
    """Tell a worker to exit (a dead one cannot be told) and reap it."""
    if w.process.exitcode is None:
        with contextlib.suppress(OSError):
            w.jobs.send(None)
    w.process.join(timeout=10)
    if w.process.exitcode is None:  # stuck: it holds nothing we want
        w.process.kill()
        w.process.join()
    w.jobs.close()
    w.results.close()


def _died_error(died: list[tuple[_Worker, ShardJob]], finished: int, total: int) -> RunError:
    w, job = died[0]
    code = w.process.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    hint = ""
    if code == -signal.SIGKILL:
        hint = "; if no one sent it, the kernel's out-of-memory killer did (see `dmesg`): lower data.num_proc"
    more = f" ({len(died) - 1} more worker(s) died too)" if len(died) > 1 else ""
    return RunError(
        f"a tokenising worker (pid {w.process.pid}) {how} while tokenising {describe(job)}{more}; the "
        f"{finished} shard(s) finished are kept: run the same command again to tokenise the other "
        f"{total - finished}{hint}"
    )


__all__ = ["describe", "tokenise_in_workers"]
