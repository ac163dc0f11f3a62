"""Shared helpers for the benchmark scripts: machine header, alternating timer, tables, peak memory.

Timing method: every candidate runs once per round, in an order that changes each round (two
alternate, more are shuffled), in one process, after warm-up; the median over rounds is reported.
On a shared machine this keeps the ratios meaningful even when absolute times drift with other load.

Peak memory on CPU: torch has no CPU allocator statistics, and tracemalloc does not see torch's
allocations, so each candidate runs in a fresh subprocess that reports the kernel's resident-set
high-water mark (VmHWM). The mark is reset (/proc/self/clear_refs) after the model is built, so
"train peak" is what the training steps add on top of the weights: gradients, optimizer state,
activations and transients. A fresh process per candidate matters because glibc keeps freed
pages, which would hide a second candidate's allocations inside the first one's footprint.
On CUDA, torch.cuda.max_memory_allocated is exact and used in-process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from moe_lm.config import ModelConfig, load_config

REPO = Path(__file__).resolve().parent.parent


def tiny_model_config(**overrides: object) -> ModelConfig:
    """The model of configs/tiny-shakespeare.yaml (the shape `make train` trains), with overrides."""
    cfg = load_config(REPO / "configs" / "tiny-shakespeare.yaml").model
    return dataclasses.replace(cfg, **overrides)  # type: ignore[arg-type]


if str(REPO) not in sys.path:  # scripts run as `python scripts/x.py` from the repo root
    sys.path.insert(0, str(REPO))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 1024 * 1024


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header(device: str) -> str:
    """Machine, library versions, thread count, load and the exact command line."""
    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}, python {platform.python_version()}",
    ]
    try:
        import transformers

        lines[-1] += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    omp = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS") if k in os.environ}
    if omp:
        lines[-1] += ", " + " ".join(f"{k}={v}" for k, v in omp.items())
    if device == "cuda" and torch.cuda.is_available():
        lines.append(f"gpu: {torch.cuda.get_device_name()}")
    if hasattr(os, "getloadavg"):
        # Other jobs on a small shared machine move absolute times a lot; ratios are the result.
        load = os.getloadavg()
        lines.append("load average at start: {:.2f} {:.2f} {:.2f}".format(*load))
        if load[0] > 0.5 * (os.cpu_count() or 1) and torch.get_num_threads() > 1:
            lines.append(
                "warning: machine busy; multi-threaded wall times stall on descheduled threads. "
                "For stable ratios run with --threads 1 --clock cpu."
            )
    lines.append("command: " + shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]))
    return "\n".join(lines)


def keep_freed_memory() -> str:
    """glibc settings of `make train` (its TRAIN_ENV), set from inside the process: large freed blocks
    stay in the heap instead of going back to the OS, so a tensor allocated again next step does not
    fault its pages in again. Without it, which candidate ran before which changes what everyone's
    allocations cost (one that frees a lot warms the heap for the next), so timings depend on the
    order and on the set of candidates. Returns a line for the header."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD
        done = [libc.mallopt(p, v) for p, v in ((-1, 1 << 30), (-2, 256 << 20), (-3, 1 << 30))]
    except (OSError, AttributeError):
        return "allocator: default (not glibc)"
    return "allocator: glibc keeps freed memory, as make train" if all(done) else "allocator: default"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def clock(kind: str) -> Callable[[], float]:
    """ "wall", or "cpu": this process's CPU time, which on a busy shared machine with one torch
    thread is close to what the wall time would be on an idle one (waiting for a core not counted)."""
    return time.process_time if kind == "cpu" else time.perf_counter


def time_alternating(
    fns: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: str = "cpu",
    clock_kind: str = "wall",
) -> dict[str, float]:
    """Median seconds per call of each fn, one call each per round, the order changing every round."""
    both = time_both_clocks(fns, rounds, warmup, device)
    return {name: t[clock_kind] for name, t in both.items()}


def time_both_clocks(
    fns: Mapping[str, Callable[[], object]], rounds: int, warmup: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """{name: {"wall": s, "cpu": s}}: medians over rounds of one call each, in an order that changes
    every round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        # Two candidates alternate (A B, B A, ...); more are shuffled each round, so no candidate
        # always runs right after the same one (and inherits its cache and allocator state).
        order = [names[(r + i) % len(names)] for i in range(len(names))]
        if len(names) > 2:
            random.Random(r).shuffle(order)
        for name in order:
            sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            samples[name]["wall"].append(time.perf_counter() - w0)
            samples[name]["cpu"].append(time.process_time() - c0)
    return {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    # First column (names) left-aligned, numbers right-aligned.
    out += [
        "| "
        + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        + " |"
        for r in cells
    ]
    return "\n".join(out)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# CPU peak memory through a child process


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0); returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _proc_status_kib("VmHWM") * 1024


def rss_supported() -> bool:
    try:
        reset_peak_rss()
        return True
    except (OSError, RuntimeError):
        return False


CHILD_MARK = "@@bench-child@@"


def child_report(payload: dict[str, object]) -> None:
    """What a child process prints for its parent (one marked JSON line on stdout)."""
    print(CHILD_MARK + json.dumps(payload), flush=True)


def run_child(args: Sequence[str], timeout: float = 600) -> dict[str, object]:
    """Run `python <args>` in a fresh process and return its child_report payload, or {"error"}."""
    try:
        proc = subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_MARK):
            return dict(json.loads(line[len(CHILD_MARK) :]))
    if proc.returncode < 0 or proc.returncode == 137:
        return {"error": f"killed (signal {-proc.returncode if proc.returncode < 0 else 9}; out of memory?)"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail[:160]}"}
