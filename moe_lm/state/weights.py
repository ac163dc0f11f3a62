"""Model weights on disk: safetensors with experts keyed by their *global* index.

In memory an MoE layer holds its experts stacked (`layers.L.ffn.experts.gate_up_proj`, [E_local, 2I, H]).
On disk every expert is its own tensor (`layers.L.ffn.experts.{e}.gate_up_proj`, [2I, H]) with e the
global expert index, so a checkpoint written at any expert-parallel size loads at any other.
Each EP rank writes `model-ep{r}-of-{n}.safetensors`; EP rank 0 also holds the non-expert weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_lm.errors import UserError

_STACKED = re.compile(r"^(.*\.ffn\.experts)\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(gate_up_proj|down_proj)$")


def split_experts(state: dict[str, torch.Tensor], expert_offset: int = 0) -> dict[str, torch.Tensor]:
    """Stacked expert tensors -> one tensor per expert under its global index."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _STACKED.match(key)
        if m is None:
            out[key] = value
            continue
        for e in range(value.shape[0]):
            out[f"{m.group(1)}.{expert_offset + e}.{m.group(2)}"] = value[e]
    return out


def stack_experts(
    state: dict[str, torch.Tensor], expert_range: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Per-expert tensors -> stacked tensors, keeping experts [start, end) (all when None)."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = _PER_EXPERT.match(key)
        if m is None:
            out[key] = value
            continue
        groups.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = value
    for key, experts in groups.items():
        start, end = expert_range if expert_range is not None else (0, max(experts) + 1)
        missing = [e for e in range(start, end) if e not in experts]
        if missing:
            raise UserError(
                f"checkpoint lacks experts {missing} of '{key}'; it is incomplete, use another one"
            )
        out[key] = torch.stack([experts[e] for e in range(start, end)])
    return out


def weight_file_name(ep_rank: int, ep_size: int) -> str:
    return f"model-ep{ep_rank}-of-{ep_size}.safetensors"


def save_weights(
    directory: Path,
    state: dict[str, torch.Tensor],
    ep_rank: int = 0,
    ep_size: int = 1,
    expert_offset: int = 0,
) -> Path:
    """Write this EP rank's share. Non-expert weights are written by EP rank 0 only."""
    per_expert = split_experts(state, expert_offset)
    if ep_rank != 0:
        per_expert = {k: v for k, v in per_expert.items() if _PER_EXPERT.match(k)}
    path = Path(directory) / weight_file_name(ep_rank, ep_size)
    save_file({k: v.detach().contiguous().cpu() for k, v in per_expert.items()}, str(path))
    return path


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All EP shards of a checkpoint merged into one per-expert state dict (on CPU)."""
    files = sorted(Path(directory).glob("model-ep*-of-*.safetensors"))
    if not files:
        raise UserError(
            f"no model weights (model-ep*-of-*.safetensors) in '{directory}'; is it a moe_lm checkpoint?"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    state[key] = handle.get_tensor(key)
        except Exception as e:  # a truncated or corrupted file
            raise UserError(
                f"cannot read weights '{f}': {e}; the checkpoint is damaged, use an earlier one"
            ) from None
    return state


def load_model_state(directory: Path, expert_range: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A state dict ready for `model.load_state_dict`, holding experts [start, end) of each layer."""
    return stack_experts(load_weights(directory), expert_range)


def resolve_checkpoint(path: str | Path) -> Path:
    """A verified checkpoint directory from a checkpoint dir, or a run / checkpoints dir (its newest
    complete checkpoint, falling back past damaged ones with a warning)."""
    from moe_lm.state.checkpoint import resolve_resume

    return resolve_resume(str(path), Path(path), key=None)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):  # -> tuple[Config, MoETransformer]
    """Config and a single-process model with every expert, from a checkpoint or run directory."""
    from moe_lm.config import load_config
    from moe_lm.model import MoETransformer

    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt / "config.yaml")
    model = MoETransformer(cfg.model)
    missing, unexpected = model.load_state_dict(load_model_state(ckpt), strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint '{ckpt}' does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return cfg, model.to(device)
