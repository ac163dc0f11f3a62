"""What each process of a 2-process gloo group does in tests/dist/test_checkpoint_write.py."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_lm.config import Config, TrainConfig
from moe_lm.errors import UserError
from moe_lm.state.checkpoint import save_checkpoint
from tests.conftest import tiny_model_config

TIMEOUT_S = 20  # a barrier left waiting fails the scenario in this time, not in parallel.timeout (1800 s)


class GlooBackend:
    """Just what save_checkpoint asks of a backend, on the default gloo group."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0

    def save_state(self, directory: Path) -> None:
        (directory / f"model-rank{self.rank}.txt").write_text("weights")

    def load_state(self, directory: Path, weights_only: bool = False) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor


def main_cannot_make_the_temp_dir(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """`checkpoints` under the output directory is a file: the main process cannot make the temp dir."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    cfg = Config(model=tiny_model_config(), train=TrainConfig(output_dir=args["output_dir"]))
    start = time.monotonic()
    try:
        save_checkpoint(cfg, GlooBackend(), 3, {"torch": torch.get_rng_state()}, None, {"step": 3})
        outcome = "saved"
    except UserError as e:
        outcome = f"UserError: {e}"
    except Exception as e:  # a barrier that timed out, a collective that did not match
        outcome = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {"outcome": outcome, "seconds": time.monotonic() - start}
