"""Experts on disk: one entry per expert under its *global* index, for weights and optimizer state alike.

In memory an MoE layer holds its E_local experts stacked (`layers.L.ffn.experts.gate_up_proj`,
[E_local, 2I, H]); on disk each expert is its own entry (`layers.L.ffn.experts.{e}.gate_up_proj`,
[2I, H]) with e the global index, so a checkpoint written at any expert-parallel size loads at any
other. The same two functions serve model weights (values are tensors) and optimizer state
(values are {state key: tensor}, where 0-dim entries such as AdamW's `step` are shared, not split).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

import torch

from moe_lm.errors import UserError
from moe_lm.model.params import is_expert_param

# A tensor (weights) or a parameter's optimizer state (AdamW: step, exp_avg, exp_avg_sq).
Entry = TypeVar("Entry", torch.Tensor, dict[str, torch.Tensor])

_INDEXED = re.compile(r"^(?P<prefix>.+)\.(?P<index>\d+)\.(?P<leaf>[^.]+)$")


def _indexed(key: str) -> tuple[str, int] | None:
    """`...experts.5.down_proj` -> (`...experts.down_proj`, 5); None for any other key."""
    m = _INDEXED.match(key)
    if m is None or not is_expert_param(key):
        return None
    return f"{m['prefix']}.{m['leaf']}", int(m["index"])


def _count(value: torch.Tensor | dict[str, torch.Tensor]) -> int:
    if isinstance(value, torch.Tensor):
        return value.shape[0]
    return next(v.shape[0] for v in value.values() if v.dim())


def _take(value: Entry, e: int) -> Entry:
    if isinstance(value, torch.Tensor):
        return value[e]
    return {k: v[e] if v.dim() else v for k, v in value.items()}


def _stack(values: list[Entry]) -> Entry:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)  # type: ignore[arg-type]
    return {k: torch.stack([v[k] for v in values]) if t.dim() else t for k, t in first.items()}  # type: ignore[call-overload]


def split_experts(state: Mapping[str, Entry], expert_offset: int = 0) -> dict[str, Entry]:
    """Stacked expert entries -> one entry per expert, keyed by global index (offset + local index)."""
    out: dict[str, Entry] = {}
    for name, value in state.items():
        if not is_expert_param(name) or _indexed(name) is not None:
            out[name] = value
            continue
        prefix, leaf = name.rsplit(".", 1)
        for e in range(_count(value)):
            out[f"{prefix}.{expert_offset + e}.{leaf}"] = _take(value, e)
    return out


def stack_experts(
    state: Mapping[str, Entry], expert_range: tuple[int, int] | None = None, strict: bool = True
) -> dict[str, Entry]:
    """Per-expert entries -> stacked ones holding experts [start, end) (all when None).

    A missing expert is a damaged checkpoint (strict), or, for optimizer state, a parameter that
    has none yet (not strict: the stacked entry is left out, as for a parameter never stepped).
    """
    out: dict[str, Entry] = {}
    groups: dict[str, dict[int, Entry]] = {}
    for key, value in state.items():
        indexed = _indexed(key)
        if indexed is None:
            out[key] = value
        else:
            groups.setdefault(indexed[0], {})[indexed[1]] = value
    for name, experts in groups.items():
        start, end = expert_range if expert_range is not None else (0, max(experts) + 1)
        missing = [e for e in range(start, end) if e not in experts]
        if missing and strict:
            raise UserError(
                f"checkpoint lacks experts {missing} of '{name}'; it is incomplete, use another one"
            )
        if not missing:
            out[name] = _stack([experts[e] for e in range(start, end)])
    return out
