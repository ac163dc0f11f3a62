"""Optimizer state on disk: `optim-ep{r}-of-{n}.pt`, keyed by parameter name, whatever the backend.

Each file holds the state of the parameters its EP rank held, experts stacked as in memory, with the
rank's global expert range, and the scheduler's step. EP rank 0 also holds the dense state (equal
on every rank). Reading splits every file's experts by global index (experts.py) and stacks the
range a rank holds, so any EP size and either backend (DDP or DeepSpeed ZeRO) resumes any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_lm.errors import UserError
from moe_lm.model.params import is_expert_param
from moe_lm.state.experts import split_experts, stack_experts

# parameter name -> its optimizer state ({"step": 0-dim, "exp_avg": tensor, ...} for AdamW)
NamedState = dict[str, dict[str, torch.Tensor]]


def optimizer_file_name(ep_rank: int, ep_size: int) -> str:
    return f"optim-ep{ep_rank}-of-{ep_size}.pt"


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
    torch.save(
        {"optimizer": named, "scheduler": {"last_epoch": scheduler_step}, "expert_range": expert_range},
        path,
    )
    return path


def load_optimizer_state(directory: Path, expert_range: tuple[int, int]) -> tuple[NamedState, int]:
    """(state by parameter name holding experts [start, end), the scheduler step) from any EP size.

    A parameter without saved state (frozen, or not stepped yet) is absent from the result."""
    files = sorted(Path(directory).glob("optim-ep*-of-*.pt"))
    if not files:
        raise UserError(
            f"checkpoint '{directory}' has no optimizer state (optim-ep*-of-*.pt); "
            "use train.init_from to start from its weights only"
        )
    per_expert: NamedState = {}
    scheduler_step = 0
    for f in files:
        blob = torch.load(f, map_location="cpu", weights_only=False)
        per_expert.update(split_experts(blob["optimizer"], blob["expert_range"][0]))
        scheduler_step = int(blob["scheduler"]["last_epoch"])
    return stack_experts(per_expert, expert_range, strict=False), scheduler_step
