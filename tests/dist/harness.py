"""Run a function in N fresh processes joined on gloo, from inside pytest.

`run_workers("tests.dist.scenarios:ddp_equivalence", 2, args)` spawns N interpreters with the
environment a torchrun/accelerate launch would give them, calls the function in each and returns
what every rank returned (torch.save'd to a temp dir). Workers end with
`barrier(); destroy_process_group(); os._exit(0)`: without it gloo sometimes aborts at exit.
A failing rank makes `mp.spawn` kill the others, so a broken collective cannot hang the suite.
"""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, nprocs: int, port: int, target: str, args: dict[str, Any], out: str, env: dict[str, str]
) -> None:
    os.environ.update(env)
    if nprocs > 1:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nprocs),
            LOCAL_WORLD_SIZE=str(nprocs),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    torch.set_num_threads(1)  # 2 processes on 2 cores
    try:
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(rank, args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)


def run_workers(
    target: str, nprocs: int, args: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> list[Any]:
    """Results of `target(rank, args)` from each of `nprocs` processes, in rank order."""
    base_env = {"OMP_NUM_THREADS": "1", "ACCELERATE_LOG_LEVEL": "error", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _entry,
            args=(nprocs, _free_port(), target, args or {}, out, {**base_env, **(env or {})}),
            nprocs=nprocs,
            join=True,
            start_method="spawn",
        )
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]
