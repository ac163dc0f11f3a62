"""The training state beside the weights: the data position (one for the whole run, JSON) and each
rank's training RNG (safetensors).

The data position is global (samples consumed per source, epoch, seed, stream positions): every
rank derives its own batches from it, so a checkpoint resumes at any number of processes and a
rank that did not exist when it was written is not reset to the start of the data. The main
process writes it once, as `data_position.json`. The RNG stream is truly per rank (router jitter):
`rng-rank{r}.safetensors`, with the world size that wrote it in its metadata.

Checkpoints from before this layout kept both in one pickle per rank (`rank{r}.pt`); they are read
by the restricted unpickler (legacy.py) and their per-rank loader states handed on for the loader
to merge into one global position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_lm.config import Config
from moe_lm.errors import UserError
from moe_lm.state.legacy import load_pickle_safely

DATA_POSITION = "data_position.json"


def rng_file_name(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


@dataclass(frozen=True)
class RunState:
    """What a resume continues from besides weights and optimizer."""

    trainer: dict[str, Any]  # trainer_state.json: step, tokens, world_size, last metrics, val loss
    data_position: dict[str, Any] | None  # global (data_position.json); None in older checkpoints
    legacy_loader_states: list[dict[str, Any]]  # older checkpoints: each rank's loader state, rank order
    rng: dict[str, torch.Tensor] | None  # this rank's training RNG, if written at this world size


def save_rng(directory: Path, rank: int, world_size: int, rng: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in rng.items()}
    save_file(tensors, str(directory / rng_file_name(rank)), metadata={"world_size": str(world_size)})


def save_data_position(directory: Path, position: dict[str, Any]) -> None:
    (directory / DATA_POSITION).write_text(json.dumps(position, indent=1))


def _load_rng(directory: Path, rank: int, world_size: int) -> dict[str, torch.Tensor] | None:
    path = directory / rng_file_name(rank)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("world_size") != str(world_size):
                return None  # another topology: the stream starts from the seed
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as e:
        raise UserError(f"cannot read {path} ({e}); the checkpoint is damaged, use an earlier one") from None


def _legacy(
    directory: Path, ckpt_cfg: Config, trainer: dict[str, Any], rank: int, world_size: int
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor] | None]:
    """Per-rank loader states (missing keys filled from the checkpoint's config) and this rank's RNG."""
    files = sorted(directory.glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
    states = [load_pickle_safely(f) for f in files]
    written_by = int(trainer.get("world_size", len(states)))
    loaders = []
    for state in states:
        loader = dict(state.get("loader") or {})
        if loader:
            loader.setdefault("seed", ckpt_cfg.train.seed)
            loader.setdefault("micro_batch_size", ckpt_cfg.train.micro_batch_size)
            loader.setdefault("dp_size", written_by)
            loaders.append(loader)
    rng = None
    if rank < len(states) and written_by == world_size and "rng" in states[rank]:
        rng = {k: v for k, v in states[rank]["rng"].items() if k in ("torch", "cuda")}
    return loaders, rng


def load_run_state(directory: Path, ckpt_cfg: Config, rank: int, world_size: int) -> RunState:
    trainer = json.loads((directory / "trainer_state.json").read_text())
    position_file = directory / DATA_POSITION
    if position_file.is_file():
        try:
            position = json.loads(position_file.read_text())
        except ValueError as e:
            raise UserError(f"cannot read {position_file} ({e}); the checkpoint is damaged") from None
        return RunState(trainer, position, [], _load_rng(directory, rank, world_size))
    loaders, rng = _legacy(directory, ckpt_cfg, trainer, rank, world_size)
    return RunState(trainer, None, loaders, rng)


__all__ = ["DATA_POSITION", "RunState", "load_run_state", "rng_file_name", "save_data_position", "save_rng"]
