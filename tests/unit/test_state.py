"""The on-disk format of moe_lm/state: experts by global index for weights and optimizer state alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_lm.errors import UserError
from moe_lm.model import MoETransformer
from moe_lm.model.params import is_expert_param
from moe_lm.state.experts import split_experts, stack_experts
from moe_lm.state.optimizer import load_optimizer_state, save_optimizer_state
from moe_lm.state.weights import load_model_state, save_weights
from tests.conftest import tiny_model_config

UP = "layers.0.ffn.experts.gate_up_proj"


def test_the_expert_predicate_names_exactly_the_routed_experts() -> None:
    model = MoETransformer(tiny_model_config(num_shared_experts=1))
    experts = sorted(n for n, _ in model.named_parameters() if is_expert_param(n))
    assert experts == sorted(
        f"layers.{i}.ffn.experts.{leaf}" for i in range(2) for leaf in ("down_proj", "gate_up_proj")
    )
    assert is_expert_param("module.layers.1.ffn.experts.7.down_proj")  # a wrapped model, a disk key
    assert not is_expert_param("layers.0.ffn.shared.w_gate_up.weight")


def test_weights_split_by_global_index_and_stack_any_range() -> None:
    stacked = {UP: torch.arange(24.0).view(4, 3, 2), "norm.weight": torch.ones(2)}
    on_disk = split_experts(stacked, expert_offset=4)  # a rank holding experts 4..7
    assert sorted(on_disk) == [
        *(f"layers.0.ffn.experts.{e}.gate_up_proj" for e in range(4, 8)),
        "norm.weight",
    ]
    assert torch.equal(on_disk["layers.0.ffn.experts.6.gate_up_proj"], stacked[UP][2])
    back = stack_experts(on_disk, (5, 7))
    assert torch.equal(back[UP], stacked[UP][1:3]) and torch.equal(
        back["norm.weight"], stacked["norm.weight"]
    )
    with pytest.raises(UserError, match=r"lacks experts \[3\]"):
        stack_experts(on_disk, (3, 5))


def test_optimizer_state_splits_moments_and_shares_the_step() -> None:
    step = torch.tensor(7.0)
    state = {UP: {"step": step, "exp_avg": torch.arange(8.0).view(2, 4)}, "norm.weight": {"step": step}}
    on_disk = split_experts(state, expert_offset=2)
    assert on_disk["layers.0.ffn.experts.3.gate_up_proj"]["step"] is step
    assert on_disk["layers.0.ffn.experts.3.gate_up_proj"]["exp_avg"].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert torch.equal(stack_experts(on_disk, (2, 4))[UP]["exp_avg"], state[UP]["exp_avg"])
    # Not strict: a parameter without state for every expert held is left out, not an error.
    assert UP not in stack_experts(on_disk, (1, 3), strict=False)


def test_two_ep_ranks_files_load_at_one_rank(tmp_path: Path) -> None:
    model = MoETransformer(tiny_model_config())
    full = model.state_dict()
    moments = {n: {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(p)} for n, p in full.items()}
    for rank, (start, end) in enumerate([(0, 4), (4, 8)]):
        cut = {n: t[start:end] if is_expert_param(n) else t for n, t in full.items()}
        save_weights(tmp_path, cut, rank, 2, start)
        named = {
            n: {**s, "exp_avg": s["exp_avg"][start:end]} if is_expert_param(n) else s
            for n, s in moments.items()
        }
        save_optimizer_state(tmp_path, named, 3, (start, end), rank, 2)
    loaded = load_model_state(tmp_path)
    assert loaded.keys() == full.keys() and all(torch.equal(loaded[n], full[n]) for n in full)
    named, step = load_optimizer_state(tmp_path, (0, 8))
    assert step == 3 and all(torch.equal(named[n]["exp_avg"], moments[n]["exp_avg"]) for n in moments)
