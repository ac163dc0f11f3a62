"""Optimizer state on disk: `optim-ep{r}-of-{n}.safetensors`, keyed by parameter name, whatever the backend.

Each file holds the state of the parameters its EP rank held, experts stacked as in memory: tensor
`{parameter}/{state key}` (e.g. `layers.0.ffn.experts.gate_up_proj/exp_avg`), and in the header's
metadata (JSON, read by safetensors' own parser) the rank's global expert range and the
scheduler's step. EP rank 0 also holds the dense state (equal on every rank). Reading splits every
file's experts by global index (experts.py) and stacks the range a rank holds, so any EP size and
either backend (DDP or DeepSpeed ZeRO) resumes any other.

Safetensors, not `torch.save`: loading a checkpoint must never run code, whoever wrote the files,
and safetensors holds tensors and string metadata only. Checkpoints written before this format
(`optim-ep*-of-*.pt`) are still read, by the restricted unpickler (legacy.py).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_lm.errors import UserError
from moe_lm.model.params import is_expert_param
from moe_lm.state.experts import split_experts, stack_experts
from moe_lm.state.legacy import load_pickle_safely

# parameter name -> its optimizer state ({"step": 0-dim, "exp_avg": tensor, ...} for AdamW)
NamedState = dict[str, dict[str, torch.Tensor]]
FORMAT = "moe_lm.optimizer/1"


def optimizer_file_name(ep_rank: int, ep_size: int) -> str:
    return f"optim-ep{ep_rank}-of-{ep_size}.safetensors"


def _flatten(named: NamedState) -> dict[str, torch.Tensor]:
    """{name/key: tensor}, each a contiguous CPU tensor with storage of its own (safetensors
    refuses tensors that share memory, as views of one buffer would)."""
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, state in named.items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer state {name}/{key} is a {type(value).__name__}, not a tensor")
            t = value.detach().cpu().contiguous()
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            flat[f"{name}/{key}"] = t
    return flat


def save_optimizer_state(
    directory: Path,
    named: NamedState,
    scheduler_step: int,
    expert_range: tuple[int, int],
    ep_rank: int = 0,
    ep_size: int = 1,
) -> Path:
    """Write this EP rank's share; only EP rank 0 writes the dense state, identical on every rank."""
    if ep_rank != 0:
        named = {n: s for n, s in named.items() if is_expert_param(n)}
    path = Path(directory) / optimizer_file_name(ep_rank, ep_size)
    meta = {
        "format": FORMAT,
        "scheduler_last_epoch": str(int(scheduler_step)),
        "expert_range": json.dumps([int(expert_range[0]), int(expert_range[1])]),
    }
    save_file(_flatten(named), str(path), metadata=meta)
    return path


def _read(path: Path) -> tuple[NamedState, int, int]:
    """(state by name, experts stacked; the scheduler step; the file's first global expert)."""
    if path.suffix == ".pt":  # written before safetensors: plain data only, or refused
        blob = load_pickle_safely(path)
        return blob["optimizer"], int(blob["scheduler"]["last_epoch"]), int(blob["expert_range"][0])
    named: NamedState = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name, _, state_key = key.rpartition("/")
                named.setdefault(name, {})[state_key] = f.get_tensor(key)
        step, first = int(meta["scheduler_last_epoch"]), int(json.loads(meta["expert_range"])[0])
    except Exception as e:  # truncated, corrupted, or not ours
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot read optimizer state '{path}' ({first_line}); the checkpoint is damaged, use an earlier one"
        ) from None
    return named, step, first


def optimizer_files(directory: Path) -> list[Path]:
    directory = Path(directory)
    return sorted(directory.glob("optim-ep*-of-*.safetensors")) or sorted(directory.glob("optim-ep*-of-*.pt"))


def load_optimizer_state(directory: Path, expert_range: tuple[int, int]) -> tuple[NamedState, int]:
    """(state by parameter name holding experts [start, end), the scheduler step) from any EP size.

    A parameter without saved state (frozen, or not stepped yet) is absent from the result."""
    files = optimizer_files(directory)
    if not files:
        raise UserError(
            f"checkpoint '{directory}' has no optimizer state (optim-ep*-of-*.safetensors); "
            "use train.init_from to start from its weights only"
        )
    per_expert: NamedState = {}
    scheduler_step = 0
    for f in files:
        named, scheduler_step, first = _read(f)
        try:
            per_expert.update(split_experts(named, first))
        except Exception as e:  # a tensor too small for its experts, a state that is not a tensor
            raise damaged(_where(files), f"its experts cannot be split ({_first_line(e)})") from None
    try:
        return stack_experts(per_expert, expert_range, strict=False), scheduler_step
    except Exception as e:  # experts of different shapes
        raise damaged(_where(files), f"its experts cannot be stacked ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _where(files: list[Path]) -> str:
    return (
        f"'{files[0]}'" if len(files) == 1 else f"in '{files[0].parent}' ({', '.join(f.name for f in files)})"
    )


def damaged(where: str, what: str) -> UserError:
    return UserError(
        f"optimizer state {where} does not fit this model: {what}; the checkpoint is damaged or not this "
        "run's: resume from another step (train.resume=PATH/step-N), or take its weights only with train.init_from"
    )


def check_optimizer_state(
    directory: Path, named: NamedState, params: Mapping[str, torch.Tensor], keys: set[str] | None
) -> None:
    """Refuse saved state that the live optimizer would choke on (a segfault, a deep traceback, or
    silently wrong moments): every name a parameter it optimizes, every moment a floating tensor of
    that parameter's shape, a scalar step, and (when known) the keys this optimizer keeps."""
    where = _where(optimizer_files(directory))
    for name, state in named.items():
        p = params.get(name)
        if p is None:
            raise damaged(where, f"'{name}' is not a parameter of this model")
        if keys is not None and set(state) != keys:
            raise damaged(where, f"'{name}' holds {sorted(state)}, the optimizer keeps {sorted(keys)}")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise damaged(where, f"'{name}/{key}' is a {type(value).__name__}, not a tensor")
            if not (
                value.is_floating_point() or (key == "step" and value.dtype in (torch.int32, torch.int64))
            ):
                raise damaged(where, f"'{name}/{key}' has dtype {value.dtype}, not a floating point type")
            if key == "step" or value.dim() == 0:
                if value.numel() != 1:
                    raise damaged(
                        where, f"'{name}/{key}' has shape {tuple(value.shape)}, not a single number"
                    )
                if not bool(torch.isfinite(value.double()).all()) or float(value) < 0:
                    raise damaged(where, f"'{name}/{key}' is {float(value)}, not a count of steps")
            elif tuple(value.shape) != shape_of(p):
                raise damaged(
                    where,
                    f"'{name}/{key}' has shape {tuple(value.shape)} but the parameter has {shape_of(p)}",
                )


def shape_of(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape (DeepSpeed ZeRO-3 keeps it as `ds_shape` while the data is partitioned)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def optimizer_state_keys(optimizer: torch.optim.Optimizer) -> set[str] | None:
    """The per-parameter state keys this optimizer keeps ({"step", "exp_avg", "exp_avg_sq"} for
    AdamW), found by stepping a copy of it on one scalar; None when that cannot be done."""
    try:
        probe = torch.nn.Parameter(torch.zeros(1))
        accepted = inspect.signature(
            type(optimizer)
        ).parameters  # defaults may hold more (AdamW's decoupled_weight_decay)
        # fused and capturable would ask for the optimizer's device for the scalar probe
        defaults = {
            k: v for k, v in optimizer.defaults.items() if k in accepted and k not in ("fused", "capturable")
        }
        copy = type(optimizer)([probe], **defaults)
        probe.grad = torch.zeros(1)
        copy.step()
        return set(copy.state[probe])
    except Exception:
        return None
