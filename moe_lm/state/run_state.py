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
from moe_lm.data.position import position_problem
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
            rng = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise damaged(path, f"it is not a readable safetensors file ({first})") from None
    problem = rng_problem(rng)
    if problem:
        raise damaged(path, problem)
    return rng


def rng_problem(rng: dict[str, torch.Tensor]) -> str | None:
    """A generator state torch would refuse with a traceback (or, for CUDA, only on the GPU)."""
    if set(rng) - {"torch", "cuda"} or "torch" not in rng:
        return f"it holds {sorted(rng)}, not a 'torch' (and 'cuda') generator state"
    for key, state in rng.items():
        if state.dtype != torch.uint8 or state.dim() != 1:
            return f"'{key}' is a {state.dtype} tensor of shape {tuple(state.shape)}, not a generator state (uint8 bytes)"
    probe = torch.Generator()
    try:
        probe.set_state(rng["torch"])
    except Exception as e:
        return f"'torch' is not a generator state ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


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


def damaged(path: Path, what: str) -> UserError:
    return UserError(
        f"checkpoint file {path} is damaged: {what}; resume from another step (train.resume=PATH/step-N) "
        "or restore the file from a copy"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise damaged(path, "it is missing") from None
    except (ValueError, OSError) as e:  # junk, not UTF-8, unreadable
        raise damaged(
            path, f"it is not readable JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def load_trainer_state(directory: Path) -> dict[str, Any]:
    path = directory / "trainer_state.json"
    trainer = _read_json(path)
    if not isinstance(trainer, dict):
        raise damaged(path, f"it holds a {type(trainer).__name__}, not an object")
    trainer.setdefault("tokens", 0)  # not kept by the earliest checkpoints
    for key in ("step", "tokens"):
        value = trainer.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise damaged(path, f"{key} is {value!r}, not a count")
    written_by = trainer.get("world_size", 1)
    if not isinstance(written_by, int) or isinstance(written_by, bool) or written_by < 1:
        raise damaged(path, f"world_size is {written_by!r}, not a number of processes")
    return trainer


def load_run_state(directory: Path, ckpt_cfg: Config, rank: int, world_size: int) -> RunState:
    trainer = load_trainer_state(directory)
    position_file = directory / DATA_POSITION
    if position_file.is_file():
        position = _read_json(position_file)
        problem = position_problem(position)
        if problem:
            raise damaged(position_file, problem)
        return RunState(trainer, position, [], _load_rng(directory, rank, world_size))
    loaders, rng = _legacy(directory, ckpt_cfg, trainer, rank, world_size)
    return RunState(trainer, None, loaders, rng)


__all__ = ["DATA_POSITION", "RunState", "load_run_state", "rng_file_name", "save_data_position", "save_rng"]
