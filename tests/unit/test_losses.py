"""Router loss formulas against hand-computed values and against transformers' Mixtral function."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe_lm.model.losses import hf_load_balance_loss, imbalance, load_balance_loss, z_loss
from moe_lm.model.router import Router
from moe_lm.model.transformer import MoETransformer
from tests.conftest import tiny_model_config

# T=4 tokens, E=2 experts, k=1: top-1 picks experts 0, 0, 1, 0 -> counts [3, 1].
HAND_PROBS = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]]
# f = [3/4, 1/4], P = [2.6/4, 1.4/4] = [0.65, 0.35]; loss = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
HAND_LOSS = 1.15


def test_load_balance_is_one_at_perfect_balance() -> None:
    # Uniform router and equal counts: E * sum_i (1/E)(1/E) = 1 for any E and k.
    for num_experts, top_k in ((2, 1), (8, 2), (16, 4)):
        tokens = 4 * num_experts
        probs = torch.full((tokens, num_experts), 1.0 / num_experts)
        counts = torch.full((num_experts,), tokens * top_k // num_experts)
        assert load_balance_loss(probs, counts, top_k).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balance_is_one_when_balanced_but_not_uniform() -> None:
    # Balance is about the means: per-token probs may be peaked as long as loads and P_i are even.
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.7, 0.3], [0.3, 0.7]])
    counts = torch.tensor([2, 2])
    assert load_balance_loss(probs, counts, 1).item() == pytest.approx(1.0, abs=1e-6)


def test_load_balance_is_num_experts_when_collapsed() -> None:
    num_experts, top_k, tokens = 8, 1, 10
    probs = torch.zeros(tokens, num_experts)
    probs[:, 3] = 1.0
    counts = torch.zeros(num_experts, dtype=torch.long)
    counts[3] = tokens * top_k
    assert load_balance_loss(probs, counts, top_k).item() == pytest.approx(float(num_experts))


def test_load_balance_hand_case_top1() -> None:
    probs = torch.tensor(HAND_PROBS)
    counts = torch.tensor([3, 1])
    assert load_balance_loss(probs, counts, 1).item() == pytest.approx(HAND_LOSS, abs=1e-6)


def test_load_balance_hand_case_top2() -> None:
    # T=2, E=4, k=2: both tokens pick {0, 1} -> f = [2/4, 2/4, 0, 0], P = [0.45, 0.35, 0.1, 0.1]
    # loss = 4 * (0.5*0.45 + 0.5*0.35) = 1.6
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])
    counts = torch.tensor([2, 2, 0, 0])
    assert load_balance_loss(probs, counts, 2).item() == pytest.approx(1.6, abs=1e-6)


def test_load_balance_gradient_flows_through_probs_only() -> None:
    # f is a constant, so d loss / d probs[t, i] = E * f_i / T = 2 * [0.75, 0.25] / 4 for every row.
    probs = torch.tensor(HAND_PROBS, requires_grad=True)
    counts = torch.tensor([3, 1])
    load_balance_loss(probs, counts, 1).backward()
    assert probs.grad is not None
    torch.testing.assert_close(probs.grad, torch.tensor([[0.375, 0.125]]).expand(4, 2))


def test_load_balance_gradient_reaches_router_weight() -> None:
    router = Router(hidden_size=8, num_experts=4, top_k=2)
    torch.nn.init.normal_(router.weight)
    route = router(torch.randn(16, 8))
    counts = torch.bincount(route.topk_idx_TK.reshape(-1), minlength=4)
    load_balance_loss(route.probs_TE, counts, 2).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_z_loss_hand_case() -> None:
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2 -> mean of squares = 2.5 (ln 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2.0) ** 2, rel=1e-6)


def test_z_loss_is_fp32_for_low_precision_logits() -> None:
    logits = torch.tensor([[10.0, 9.0, 8.0]], dtype=torch.bfloat16)
    lse = math.log(math.exp(10.0) + math.exp(9.0) + math.exp(8.0))
    out = z_loss(logits)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(lse**2, rel=1e-6)


def test_hf_load_balance_is_k_at_balance() -> None:
    # One layer, T=4, E=4, k=2, counts [2]*4: f = 2/4 each (HF divides by T, not T*k), P = 1/4.
    for top_k in (1, 2, 4):
        counts = torch.full((1, 4), top_k)
        probs_mean = torch.full((1, 4), 0.25)
        assert hf_load_balance_loss(counts, probs_mean, num_tokens=4).item() == pytest.approx(float(top_k))


def test_hf_load_balance_pools_layers() -> None:
    # T=2, E=2, k=1. Layer 0: counts [2, 0], P [0.8, 0.2]; layer 1: counts [1, 1], P [0.5, 0.5].
    # Pooled: f = [3, 1] / 4, P = [0.65, 0.35] -> 2 * (0.75*0.65 + 0.25*0.35) = 1.15,
    # not the mean of the per-layer values (1.6 + 1.0) / 2 = 1.3.
    counts = torch.tensor([[2, 0], [1, 1]])
    probs_mean = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    assert hf_load_balance_loss(counts, probs_mean, num_tokens=2).item() == pytest.approx(1.15, abs=1e-6)


def _transformers_aux(logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    # transformers annotates the argument as tuple[Tensor] (length one) but takes one per layer.
    value = load_balancing_loss_func(tuple(logits), num_experts, top_k)  # type: ignore[arg-type]
    assert isinstance(value, torch.Tensor)
    return value


@pytest.mark.parametrize(("num_layers", "num_experts", "top_k"), [(1, 4, 1), (3, 8, 2), (4, 16, 4)])
def test_hf_load_balance_matches_transformers(num_layers: int, num_experts: int, top_k: int) -> None:
    tokens, hidden = 32, 16
    counts, probs_mean, logits = [], [], []
    for _ in range(num_layers):
        router = Router(hidden, num_experts, top_k)
        torch.nn.init.normal_(router.weight)
        route = router(torch.randn(tokens, hidden))
        logits.append(route.logits_TE)
        counts.append(torch.bincount(route.topk_idx_TK.reshape(-1), minlength=num_experts))
        probs_mean.append(route.probs_TE.mean(dim=0))
    ours = hf_load_balance_loss(torch.stack(counts), torch.stack(probs_mean), tokens)
    theirs = _transformers_aux(logits, num_experts, top_k)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


def test_model_reports_transformers_aux_value() -> None:
    # The number in CausalLMOutput.hf_aux_loss is what transformers computes from the same logits.
    cfg = tiny_model_config(num_layers=3)
    model = MoETransformer(cfg).eval()
    captured: list[torch.Tensor] = []
    for layer in model.moe_layers:
        layer.router.register_forward_hook(lambda _m, _i, out: captured.append(out.logits_TE))
    out = model(torch.randint(0, cfg.vocab_size, (2, 12)))
    theirs = _transformers_aux(captured, cfg.num_experts, cfg.top_k)
    assert out.hf_aux_loss is not None
    torch.testing.assert_close(out.hf_aux_loss, theirs.float(), rtol=1e-5, atol=1e-6)


def test_imbalance() -> None:
    assert imbalance(torch.tensor([4, 4, 4, 4])).item() == pytest.approx(1.0)
    assert imbalance(torch.tensor([16, 0, 0, 0])).item() == pytest.approx(4.0)  # = E when collapsed
    assert imbalance(torch.tensor([6, 2, 2, 2])).item() == pytest.approx(2.0)  # 6 / mean 3
    assert torch.isfinite(imbalance(torch.zeros(4, dtype=torch.long)))  # no tokens: no NaN


def test_router_entropy_by_hand_and_from_the_forward() -> None:
    from moe_lm.model.losses import router_entropy

    assert router_entropy(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(8))
    assert router_entropy(torch.eye(4)).item() == 0.0
    # token 1: -(0.5 ln 0.5) * 2 = ln 2; token 2: 0 -> mean ln(2) / 2
    assert router_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).item() == pytest.approx(math.log(2) / 2)
    model = MoETransformer(tiny_model_config(init_std=0.3))
    probs: list[torch.Tensor] = []
    for layer in model.moe_layers:
        layer.router.register_forward_hook(lambda m, i, out: probs.append(out.probs_TE))
    out = model(torch.randint(0, 128, (2, 8)))
    want = [float(-(p * p.log()).sum(-1).mean().detach()) for p in probs]
    assert out.router_entropy_L.tolist() == pytest.approx(want, rel=1e-5)
    assert not out.router_entropy_L.requires_grad
