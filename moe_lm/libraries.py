"""Settings for the libraries moe_lm drives: where DeepSpeed builds its ops, and their known-harmless noise.

- DeepSpeed compiles its C++ ops (the CPU shared-memory comm op, ~100 s on 2 cores) through
  `torch.utils.cpp_extension` into `TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`,
  which every Python environment of the user shares: two environments with different builds
  rebuild the op over each other on every start. We point it into the environment itself
  (`sys.prefix`) unless it is set.
- On a machine without CUDA, DeepSpeed logs "Setting accelerator to CPU. If you have GPU or other
  accelerator, we were unable to detect it." in every process that imports it (training workers,
  `accelerate launch`, and `export`, through transformers). Naming the CPU accelerator it would
  pick (`DS_ACCELERATOR=cpu`) leaves it nothing to say; with CUDA nothing is set.
- DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on every
  start, also when the op only loads from the cache (`drop_build_notice`).
- ZeRO calls `torch.distributed.all_gather_into_tensor` / `reduce_scatter_tensor`, which torch
  2.13 marks deprecated with a FutureWarning per process: not ours to fix, and not the user's.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
BUILD_NOTICE = "built successfully"


def extensions_dir() -> Path:
    """Where this environment's compiled torch/DeepSpeed ops live."""
    return Path(os.environ.get(EXTENSIONS_ENV) or Path(sys.prefix) / "torch_extensions")


def configure_deepspeed() -> None:
    """Call before DeepSpeed is imported (directly or by accelerate / transformers)."""
    os.environ.setdefault(EXTENSIONS_ENV, str(extensions_dir()))
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )


@contextlib.contextmanager
def drop_build_notice() -> Iterator[None]:
    """Print what the block prints, except DeepSpeed's "... built successfully" line."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(True) if BUILD_NOTICE not in line]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()
