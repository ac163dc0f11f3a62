"""Bounded waits on other processes, and errors that name who was waited on and for what.

A multi-process run waits on its peers in two ways, and neither may hang:
- collectives (all-reduce, all-to-all, DDP, DeepSpeed): every process group is created with
  `parallel.timeout`, so a peer that never arrives ends the collective with gloo's or NCCL's
  timeout; `Waits.explain` turns that (or a peer's closed connection) into one line that says which
  process was where, from the board below;
- host-side barriers (run directory, tokenizer, token store, checkpoint phases, shutdown):
  `Waits.barrier`, through the launcher's key-value store. It ends when every process arrives,
  when one announces that it failed (`announce_failure`), when one stops beating (dead: killed,
  or its node is gone), or after `parallel.timeout`. A barrier with `idle=True` (the token store,
  which one process may spend hours preparing) times out only after that long without progress.

Each process keeps a heartbeat in the store from a daemon thread, once a second: where it is
(`doing`, set by the main thread at no cost), since when, and when it last made progress. The
training step never touches the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from moe_lm.errors import PeerFailed, RunError, UserError, WaitTimeout

DEFAULT_TIMEOUT_S = {"cpu": 1800.0, "cuda": 600.0}  # gloo's and NCCL's own defaults
BEAT_S = 1.0  # heartbeat period
DEAD_AFTER_S = 15.0  # no heartbeat for this long: the process is gone (killed, node lost)

# What gloo, NCCL and the store client say when the process at the other end went away, and when a
# collective ran past the group's timeout (only in the errors of torch.distributed, see `_from_comms`).
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "NCCL communicator was aborted",
    "ncclRemoteError",
    "remote process exiting",
    "Connection was likely closed",
)
_TIMED_OUT = ("Timed out waiting", "Watchdog caught collective operation timeout")


def _from_comms(error: BaseException) -> bool:
    """Raised by torch.distributed (its own error types, or gloo's RuntimeError naming its source)."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in ("gloo", "NCCL", "c10d"))
    )


def resolve_timeout(setting: float | None, device_type: str) -> float:
    """parallel.timeout in seconds; None: gloo's default on CPU, NCCL's on GPU."""
    return float(setting) if setting is not None else DEFAULT_TIMEOUT_S[device_type]


@dataclass(frozen=True)
class Beat:
    """One process's heartbeat as read from the store."""

    where: str
    since: float  # when it started doing `where`
    beat: float  # when it last beat (alive)
    progress: float  # when it last reported progress


class Waits:
    """This process's bounded waits on the others. A single process gets one that never waits."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        store: Any = None,
        dead_after_s: float = DEAD_AFTER_S,
    ) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.dead_after_s = min(dead_after_s, timeout_s) if timeout_s > 0 else dead_after_s
        self._store = store
        self._seq = 0
        self._announced = False
        self._seen: dict[int, tuple[Beat | None, float, float]] = {}
        now = time.time()
        self._where, self._since, self._progress = "starting", now, now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if store is not None and world_size > 1:
            beat_store = store.clone()  # its own connection: store clients are not shared by threads
            self._thread = threading.Thread(target=self._beat_loop, args=(beat_store,), daemon=True)
            self._thread.start()

    @classmethod
    def join(cls, timeout_s: float, dead_after_s: float = DEAD_AFTER_S) -> Waits:
        """For the process group this process has joined (none: a single process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls(0, 1, timeout_s)
        run = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        base = dist.distributed_c10d._get_default_store()
        # A process group may host several runs one after another (tests, notebooks): each join gets
        # keys of its own, or the second run's barriers would find the first run's counts complete
        # and pass at once. Every process joins in the same order, so its own n-th join is everyone's.
        generation = base.add(f"moe_lm/{run}/joins/{dist.get_rank()}", 1)
        store = dist.PrefixStore(f"moe_lm/{run}/{generation}/", base)
        return cls(dist.get_rank(), dist.get_world_size(), timeout_s, store, dead_after_s)

    # ---- where this process is ----------------------------------------------------------------

    @property
    def where(self) -> str:
        return self._where

    def doing(self, where: str) -> None:
        """What this process is doing now, for the errors of processes that wait on it. Free: the
        heartbeat thread publishes it."""
        self._where, self._since = where, time.time()

    @contextlib.contextmanager
    def phase(self, where: str) -> Iterator[None]:
        before = self._where
        self.doing(where)
        try:
            yield
        finally:
            self.doing(before)

    def progress(self) -> None:
        """Still working (e.g. tokenising): a barrier with idle=True keeps waiting for it."""
        self._progress = time.time()

    def _beat_loop(self, store: Any) -> None:
        while not self._stop.is_set():
            now = time.time()
            record = {"where": self._where, "since": self._since, "beat": now, "progress": self._progress}
            try:
                store.set(f"beat/{self.rank}", json.dumps(record))
            except Exception:  # the store is gone: the run is ending; nothing to tell anyone
                return
            self._stop.wait(BEAT_S)

    def _beats(self, ranks: list[int]) -> dict[int, Beat | None]:
        out: dict[int, Beat | None] = {}
        for r in ranks:
            key = f"beat/{r}"
            out[r] = Beat(**json.loads(self._store.get(key))) if self._store.check([key]) else None
        return out

    def _observe(self, ranks: list[int]) -> dict[int, tuple[Beat | None, float, float]]:
        """rank -> (its heartbeat, when it last beat, when it last made progress), the times on this
        process's clock: when the heartbeat was first seen to change (other nodes' clocks may be off)."""
        now = time.time()
        out = {}
        for r, beat in self._beats(ranks).items():
            seen = self._seen.get(r)
            if seen is None:
                alive_at = progress_at = now
            else:
                before, alive_at, progress_at = seen
                if beat != before:
                    alive_at = now
                if beat is not None and before is not None and beat.progress != before.progress:
                    progress_at = now
            self._seen[r] = out[r] = (beat, alive_at, progress_at)
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * BEAT_S)

    # ---- failures -------------------------------------------------------------------------------

    def announce_failure(self, error: BaseException) -> None:
        """Tell every process waiting on this one that it failed, so they stop at once. Not for a
        consequence (this process only saw another fail): that one's own announcement stands."""
        if self._store is None or self._announced:
            return
        if not isinstance(error, UserError | RunError):
            error = self.explain(error) or error  # a timed-out collective: say so, not gloo's words
        if getattr(error, "consequence", False):
            return
        self._announced = True
        text = str(error).strip().splitlines()
        line = text[0] if text else ""
        if isinstance(error, UserError | RunError):
            summary = line
        else:
            summary = f"{type(error).__name__}: {line}" if line else type(error).__name__
        with contextlib.suppress(Exception):  # best effort: the store may be gone too
            self._store.set(f"failed/{self.rank}", json.dumps({"where": self._where, "error": summary}))
            self._store.add("failed/count", 1)

    def _failure(self) -> PeerFailed | None:
        if self._store.add("failed/count", 0) == 0:
            return None
        for r in range(self.world_size):
            key = f"failed/{r}"
            if r != self.rank and self._store.check([key]):
                info = json.loads(self._store.get(key))
                return PeerFailed(
                    f"process {r} failed during '{info['where']}' ({info['error']}); process {self.rank} "
                    f"stopped as a consequence: the cause is process {r}'s error"
                )
        return None

    # ---- barriers -------------------------------------------------------------------------------

    def barrier(self, what: str, *, idle: bool = False) -> None:
        """Wait until every process arrives at `what` (every process calls barriers in the same
        order, with the same names). Raises PeerFailed or WaitTimeout instead of hanging."""
        if self._store is None:
            return
        self._seq += 1
        key = f"barrier/{self._seq}/{what}"
        with self.phase(f"waiting at '{what}'"):
            self._store.set(f"{key}/{self.rank}", "1")
            if self._store.add(f"{key}/count", 1) < self.world_size:
                self._wait(key, what, idle)

    def _wait(self, key: str, what: str, idle: bool) -> None:
        start = last_check = time.time()
        self._seen.clear()
        pause = 0.001
        while self._store.add(f"{key}/count", 0) < self.world_size:
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
            now = time.time()
            if now - last_check < 1.0 and now - start < self.timeout_s:
                continue
            last_check = now
            failed = self._failure()
            if failed is not None:
                raise failed
            missing = [r for r in range(self.world_size) if not self._store.check([f"{key}/{r}"])]
            if missing:  # none: the last one arrived since the count was read
                self._check_missing(what, missing, start, now, idle)

    def _check_missing(self, what: str, missing: list[int], start: float, now: float, idle: bool) -> None:
        observed = self._observe(missing)
        beats = {r: beat for r, (beat, _, _) in observed.items()}
        for r, (beat, alive_at, _) in observed.items():
            if now - alive_at > self.dead_after_s:
                doing = f" during '{beat.where}'" if beat is not None else ""
                raise PeerFailed(
                    f"process {r} stopped responding{doing} (no heartbeat for {now - alive_at:.0f} s) while "
                    f"process {self.rank} waited at '{what}': it was most likely killed; see its exit status"
                )
        if idle:
            latest = max(progress_at for _, _, progress_at in observed.values())
            if now - latest < self.timeout_s:
                return
            raise WaitTimeout(
                f"process {self.rank} waited at '{what}' and {_ranks(missing)} made no progress for "
                f"{now - latest:.0f} s (parallel.timeout = {self.timeout_s:g} s); {_describe(beats)}"
            )
        if now - start >= self.timeout_s:
            raise WaitTimeout(
                f"process {self.rank} waited {now - start:.0f} s at '{what}' for {_ranks(missing)} "
                f"(parallel.timeout = {self.timeout_s:g} s); {_describe(beats)}; raise parallel.timeout "
                "if that work is just slow"
            )

    # ---- errors of collectives ------------------------------------------------------------------

    def explain(self, error: BaseException) -> RunError | None:
        """A collective's timeout or a lost peer, as one line naming who was where (an error whose
        class says `consequence = True` becomes one line as it is); None for anything else (a real
        crash of this process, which keeps its traceback)."""
        if isinstance(error, RunError):
            return error
        if getattr(error, "consequence", False):  # e.g. a peer's failed checkpoint write, said by its class
            return PeerFailed(str(error))
        text = str(error)
        lost = any(marker in text for marker in _PEER_LOST)
        timed_out = not lost and any(marker in text for marker in _TIMED_OUT)
        if not (lost or timed_out) or not _from_comms(error) or self._store is None:
            return None
        where = self._where
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            failed = self._failure()
            if failed is not None:
                return failed
            if timed_out:
                return WaitTimeout(
                    f"process {self.rank} timed out after {self.timeout_s:g} s (parallel.timeout) in a collective "
                    f"during '{where}'; {_describe(self._beats(others))}"
                )
            # which one went away: those whose heartbeat stops (watched for two beats)
            self._seen.clear()
            self._observe(others)
            time.sleep(2 * BEAT_S + 0.5)
            observed = self._observe(others)
            dead = [r for r, (_, alive_at, _) in observed.items() if time.time() - alive_at > 2 * BEAT_S]
        except Exception:  # the store went with the peer that hosted it
            return PeerFailed(
                f"process {self.rank} lost its connection to the other processes during '{where}': "
                "another process stopped; its exit status is the cause"
            )
        return PeerFailed(
            f"{_ranks(dead) if dead else 'another process'} went away during '{where}' (process {self.rank}'s "
            "connection to it closed); its own error or exit status is the cause"
        )


def _describe(beats: dict[int, Beat | None]) -> str:
    parts = []
    for r, beat in beats.items():
        if beat is None:
            parts.append(f"process {r} never reported where it is")
        else:  # how long, by its own clock
            parts.append(f"process {r} is at '{beat.where}' (for {beat.beat - beat.since:.0f} s)")
    return ", ".join(parts)


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"process {ranks[0]}"
    return "processes " + ", ".join(str(r) for r in ranks)


def init_kwargs(timeout_s: float | None, backend: str | None = None) -> Any:
    """accelerate's InitProcessGroupKwargs with this timeout (torch's and DeepSpeed's init take it).
    accelerate passes on only the fields that differ from its defaults, so 600 s is dropped there:
    `set_group_timeout` (called first) makes it torch's default too."""
    from accelerate.utils import InitProcessGroupKwargs

    fields: dict[str, Any] = {"backend": backend} if backend else {}
    if timeout_s is not None:
        fields["timeout"] = timedelta(seconds=timeout_s)
    return InitProcessGroupKwargs(**fields)


def set_group_timeout(seconds: float) -> None:
    """Process groups created from now on without a timeout of their own (the default group when
    accelerate drops the timeout, the expert groups, DeepSpeed's) get `seconds` instead of torch's
    defaults (30 minutes for gloo, 10 for NCCL)."""
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timedelta(seconds=seconds)
    if c10d.default_pg_nccl_timeout is not None:
        c10d.default_pg_nccl_timeout = timedelta(seconds=seconds)


__all__ = ["DEFAULT_TIMEOUT_S", "Waits", "init_kwargs", "resolve_timeout", "set_group_timeout"]
