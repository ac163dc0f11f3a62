"""Deterministic fault injection for the crash-safety tests: `MOE_LM_FAULT=<point>:<step>[@rank][,...]`
(with `@rank`, only the process of that RANK fails).

A real run dies at an arbitrary instant (OOM killer, node loss, a full disk). A test cannot hit a
given instant by timing, so the places where dying matters call `hit(site, step)` and this module
decides, from the environment, whether to die there. Unset (every real run), a call is one dict
lookup. Points and what they do at their site:

  mid_step:N      SIGKILL during step N, after backward and before the optimizer step
  pause:N         at the same place, wait (≤ 60 s) for SIGTERM/SIGINT from outside, then go on
  nan:N           make step N's loss NaN (so its gradients are non-finite)
  ckpt_files:N    SIGKILL while writing checkpoint N: weights/optimizer written, no manifest yet
  ckpt_manifest:N SIGKILL after checkpoint N's manifest, before its directory is renamed
  ckpt_renamed:N  SIGKILL after the rename, before `latest` names it
  ckpt_done:N     SIGKILL right after checkpoint N is complete and pruning is done
  prune:N         SIGKILL in the middle of keep-last-N pruning after checkpoint N
  enospc:N        raise OSError(ENOSPC) while writing checkpoint N (a full disk)
  enospc_latest:N raise OSError(ENOSPC) writing `latest` after checkpoint N is complete
  enospc_metrics:N  raise OSError(ENOSPC) writing step N's line of metrics.jsonl
  enospc_shard:N  raise OSError(ENOSPC) writing the N-th token-store shard this process writes
  metrics:N       SIGKILL halfway through writing step N's metrics line
  shard:N         SIGKILL while preparing the token store: the N-th shard this process writes has
                  its ids and document files, not yet its manifest
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ENV = "MOE_LM_FAULT"

# point -> (site, action)
POINTS: dict[str, tuple[str, str]] = {
    "mid_step": ("step", "kill"),
    "pause": ("step", "pause"),
    "nan": ("loss", "nan"),
    "ckpt_files": ("ckpt_files", "kill"),
    "ckpt_manifest": ("ckpt_manifest", "kill"),
    "ckpt_renamed": ("ckpt_renamed", "kill"),
    "ckpt_done": ("ckpt_done", "kill"),
    "prune": ("prune", "kill"),
    "enospc": ("ckpt_files", "enospc"),
    "enospc_latest": ("ckpt_latest", "enospc"),
    "enospc_metrics": ("metrics_write", "enospc"),
    "enospc_shard": ("shard_write", "enospc"),
    "metrics": ("metrics", "tear"),
    "shard": ("shard", "kill"),
}


def _armed(site: str) -> dict[int, str]:
    """{step: action} armed at `site`; a malformed spec is an error, so a typo never passes silently."""
    spec = os.environ.get(ENV, "")
    found: dict[int, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, at = item.partition(":")
        at, _, rank = at.partition("@")
        if name not in POINTS or not at.isdigit() or not (rank == "" or rank.isdigit()):
            raise ValueError(
                f"{ENV}={spec!r}: expected <point>:<step>[@rank] with point one of {', '.join(POINTS)}"
            )
        if rank and int(rank) != int(os.environ.get("RANK", "0")):
            continue
        if POINTS[name][0] == site:
            found[int(at)] = POINTS[name][1]
    return found


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _pause_for_signal(step: int) -> None:
    """Stand still until a stop signal arrives, so a test can send it at a known step."""
    got: list[int] = []
    previous: dict[int, Any] = {
        s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }

    def chain(signum: int, frame: Any) -> None:
        got.append(signum)
        handler = previous[signum]
        if callable(handler):  # the trainer's StopRequested: it must still see the signal
            handler(signum, frame)

    for s in previous:
        signal.signal(s, chain)
    try:
        print(f"fault: paused at step {step}, waiting for a signal", flush=True)
        deadline = time.monotonic() + 60.0
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def hit(site: str, step: int, path: Path | None = None) -> None:
    """Called at a fault site; does nothing unless MOE_LM_FAULT arms this site at this step."""
    if ENV not in os.environ:
        return
    action = _armed(site).get(step)
    if action == "kill":
        _die()
    elif action == "pause":
        _pause_for_signal(step)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, "No space left on device (injected by MOE_LM_FAULT)", str(path or ""))


def poison(loss: Any, step: int) -> Any:
    """`loss`, or NaN times it when `nan:<step>` is armed (gradients become non-finite too)."""
    if ENV in os.environ and _armed("loss").get(step) == "nan":
        return loss * float("nan")
    return loss


def torn_write(path: Path, record: dict[str, Any], step: int) -> None:
    """When `metrics:<step>` is armed: write half of the record's JSON line to `path` and die, as a
    kill in the middle of the write would."""
    if ENV in os.environ and _armed("metrics").get(step) == "tear":
        line = json.dumps(record) + "\n"
        with open(path, "a") as f:
            f.write(line[: len(line) // 2])
        _die()
