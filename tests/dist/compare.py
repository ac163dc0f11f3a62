"""Put per-rank results back together (experts were split by EP rank) and measure differences."""

from __future__ import annotations

from typing import Any

import torch

from moe_lm.model.params import is_expert_param


def _sharded(runs: list[dict[str, Any]]) -> bool:
    return len(runs) > 1 and runs[0]["expert_range"] != runs[1]["expert_range"]


def gather(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """`{name: tensor}` or `{name: {state key: tensor}}` of every rank -> one process's view."""
    first = runs[0][key]
    if not _sharded(runs):
        return dict(first)
    out: dict[str, Any] = {}
    for name, value in first.items():
        if not is_expert_param(name):
            out[name] = value
        elif isinstance(value, dict):
            out[name] = {
                k: torch.cat([r[key][name][k] for r in runs]) if v.dim() else v for k, v in value.items()
            }
        else:
            out[name] = torch.cat([r[key][name] for r in runs])
    return out


def shard(full: dict[str, Any], expert_range: tuple[int, int]) -> dict[str, Any]:
    """One process's `{name: ...}` -> what the rank holding experts [start, end) has."""
    start, end = expert_range

    def cut(v: torch.Tensor) -> torch.Tensor:
        return v[start:end] if v.dim() else v

    out: dict[str, Any] = {}
    for name, value in full.items():
        if is_expert_param(name):
            out[name] = {k: cut(v) for k, v in value.items()} if isinstance(value, dict) else cut(value)
        else:
            out[name] = value
    return out


def max_err(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest |a - b| over every tensor of two same-keyed (possibly nested) dicts."""
    assert set(a) == set(b), f"different keys: {sorted(set(a) ^ set(b))[:5]}"
    worst = 0.0
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, dict):
            worst = max(worst, max_err(x, y))
        else:
            assert x.shape == y.shape, f"{name}: {tuple(x.shape)} vs {tuple(y.shape)}"
            worst = max(worst, float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
    return worst


def losses_of_shard(one_process: list[float], shard_index: int, shards: int = 2) -> list[float]:
    """The reference runs both shards per step: pick one shard's losses, in step order."""
    return one_process[shard_index::shards]
