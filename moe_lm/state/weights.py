"""Model weights on disk: safetensors with experts keyed by their *global* index (see experts.py).

Each EP rank writes `model-ep{r}-of-{n}.safetensors` holding its experts; EP rank 0 also holds the
non-expert weights. Reading merges every file, so any EP size loads a checkpoint of any other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_lm.config import Config, ModelConfig, load_config
from moe_lm.errors import UserError
from moe_lm.model import MoETransformer
from moe_lm.model.params import build_meta_model, is_expert_param
from moe_lm.state.experts import split_experts, stack_experts
from moe_lm.state.resolve import resolve_checkpoint


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
    if ep_rank != 0:
        state = {k: v for k, v in state.items() if is_expert_param(k)}
    per_expert = split_experts(state, expert_offset)
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


def check_loaded(directory: Path, state: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> None:
    """Weights read from a checkpoint against the model they go into (this rank's experts): the
    same names, each of its shape, and floating point where the model's is (an integer tensor would
    be cast silently; a wrong shape is a deep traceback)."""

    def refuse(what: str) -> UserError:
        return UserError(
            f"weights in '{directory}' (model-ep*-of-*.safetensors) do not fit this model: {what}; the checkpoint "
            "is damaged or not this run's: resume from another step (train.resume=PATH/step-N)"
        )

    missing = sorted(set(live) - set(state))
    unexpected = sorted(set(state) - set(live))
    if missing or unexpected:
        raise refuse(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, want in live.items():
        got = state[key]
        shape = tuple(getattr(want, "ds_shape", want.shape))
        if tuple(got.shape) != shape:
            raise refuse(f"'{key}' has shape {tuple(got.shape)} but the model needs {shape}")
        if want.is_floating_point() and not got.is_floating_point():
            raise refuse(f"'{key}' has dtype {got.dtype}, the model needs {want.dtype}")


def check_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor our model needs, with its shape, and nothing else (one line on a mismatch)."""
    expected = {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{source} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise UserError(
                f"{source}: '{key}' has shape {tuple(state[key].shape)} but the config needs {shape}"
            )


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[Config, MoETransformer]:
    """Config and a single-process model with every expert, from a checkpoint or run directory."""
    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt / "config.yaml")
    model = MoETransformer(cfg.model)
    missing, unexpected = model.load_state_dict(load_model_state(ckpt), strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint '{ckpt}' does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return cfg, model.to(device)
