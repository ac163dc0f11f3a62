"""Every optimised MoE path equals a naive per-token reference: forward and gradients.

The reference loops over (token, slot) pairs with plain autograd ops in float64. The optimised
paths run in float32, where they must match within 1e-6 of each tensor's scale (max(1, max|ref|);
fp32 sums of ~100 terms carry ~1e-6 relative rounding), and in float64, where they must match to
1e-10 elementwise, which no formula slip could pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lm.model import expert_threads
from moe_lm.model import experts as experts_module
from moe_lm.model.dispatch import LocalDispatcher, combine, plan_routing
from moe_lm.model.expert_threads import slices
from moe_lm.model.experts import Experts
from moe_lm.model.moe import MoELayer
from tests.conftest import tiny_model_config

T, H, INTER, E = 96, 16, 24, 8
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(params=[1, 40, 1 << 20], ids=["group-per-expert", "group-40-rows", "one-group"], autouse=True)
def group_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The loop paths process experts in groups of contiguous rows; cover every grouping."""
    monkeypatch.setattr(experts_module, "GROUP_ROWS", request.param)
    return int(request.param)


def make_experts(num_experts: int = E, impl: str = "loop", dtype: torch.dtype = torch.float32) -> Experts:
    ex = Experts(num_experts, H, INTER, impl).to(dtype)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0.0, 0.25)
        ex.down_proj.normal_(0.0, 0.25)
    return ex


def routing(
    k: int, unused_expert: int | None = 3, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx, topk_weight) with one expert never chosen, to cover empty experts."""
    logits = torch.randn(T, E)
    if unused_expert is not None:
        logits[:, unused_expert] = -1e4
    w, idx = torch.topk(logits.softmax(-1), k)
    return idx, (w / w.sum(-1, keepdim=True)).to(dtype).requires_grad_()


def kept_assignments(idx_TK: torch.Tensor, capacity: int | None) -> list[tuple[int, int]]:
    """(token, slot) pairs served: slot-major order, first `capacity` per expert."""
    taken = [0] * E
    kept = []
    for j in range(idx_TK.shape[1]):
        for t in range(idx_TK.shape[0]):
            e = int(idx_TK[t, j])
            if capacity is None or taken[e] < capacity:
                taken[e] += 1
                kept.append((t, j))
    return kept


def naive_moe(
    x_TH: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor, ex: Experts, capacity: int | None
) -> torch.Tensor:
    """float64, one (token, slot) at a time."""
    gu, down = ex.gate_up_proj.double(), ex.down_proj.double()
    x, w = x_TH.double(), w_TK.double()
    rows = [torch.zeros(H, dtype=torch.float64) for _ in range(T)]
    for t, j in kept_assignments(idx_TK, capacity):
        e = int(idx_TK[t, j])
        h = gu[e] @ x[t]
        y = down[e] @ (F.silu(h[:INTER]) * h[INTER:])
        rows[t] = rows[t] + w[t, j] * y
    return torch.stack(rows)


def grads(out: torch.Tensor, leaves: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, leaves, g.to(out.dtype)))


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """float64: 1e-10 elementwise; float32: 1e-6 of the tensor's scale."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if got.numel() == 0:
        return
    err = (got.double() - want.double()).abs().max().item()
    if got.dtype == torch.float64:
        assert err <= 1e-10, f"{what}: max abs error {err:.2e} > 1e-10 (float64)"
    else:
        scale = max(1.0, want.double().abs().max().item())
        assert err <= 1e-6 * scale, f"{what}: max abs error {err:.2e} > 1e-6 * {scale:.2f} (float32)"


def assert_matches(out: torch.Tensor, ref: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    """Output and the gradient of every leaf, for one random upstream gradient."""
    g = torch.randn(ref.shape, dtype=torch.float64)
    assert_close(out, ref, "output")
    for i, (got, want) in enumerate(zip(grads(out, leaves, g), grads(ref, leaves, g))):
        assert_close(got, want, f"gradient of leaf {i}")


IMPLS = ["loop", "grouped_mm"]


def skip_unsupported(impl: str, dtype: torch.dtype = torch.float32) -> None:
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    if impl == "grouped_mm" and dtype == torch.float64:
        pytest.skip("torch._grouped_mm has no float64 kernel")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", [None, 20])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_local_dispatcher_equals_naive(k: int, capacity: int | None, dtype: torch.dtype, impl: str) -> None:
    skip_unsupported(impl, dtype)
    ex = make_experts(impl=impl, dtype=dtype)
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    idx, w = routing(k, dtype=dtype)
    out, dropped = LocalDispatcher()(x, idx, w, ex, E, capacity)
    ref = naive_moe(x, idx, w, ex, capacity)
    assert int(dropped) == T * k - len(kept_assignments(idx, capacity))
    assert_matches(out, ref, [x, w, ex.gate_up_proj, ex.down_proj])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("capacity", [None, 20])
def test_experts_forward_then_combine_equals_naive(capacity: int | None, dtype: torch.dtype) -> None:
    """The seam the all-to-all dispatcher uses: plan_routing -> Experts.forward -> combine."""
    ex = make_experts(dtype=dtype)
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    idx, w = routing(2, dtype=dtype)
    plan = plan_routing(idx, E, capacity)
    out = combine(ex(x[plan.token_idx], plan.counts_E), plan, w, T)
    assert_matches(out, naive_moe(x, idx, w, ex, capacity), [x, w, ex.gate_up_proj, ex.down_proj])


def test_forward_combined_equals_forward_then_combine() -> None:
    ex = make_experts(dtype=torch.float64)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    idx, w = routing(2, dtype=torch.float64)
    plan = plan_routing(idx, E, 30)
    weight_S = w.t().reshape(-1)[plan.order]
    fused = ex.forward_combined(x, plan.token_idx, plan.counts_E, weight_S)
    plain = combine(ex(x[plan.token_idx], plan.counts_E), plan, w, T)
    assert_matches(fused, plain, [x, w, ex.gate_up_proj, ex.down_proj])


@pytest.mark.parametrize("impl", IMPLS)
def test_experts_with_no_rows_get_zero_gradient_and_frozen_weights_work(impl: str) -> None:
    skip_unsupported(impl)
    ex = make_experts(impl=impl)
    x = torch.randn(T, H, requires_grad=True)
    idx, w = routing(2, unused_expert=5)
    out, _ = LocalDispatcher()(x, idx, w, ex, E, None)
    out.square().sum().backward()
    assert ex.gate_up_proj.grad is not None and ex.down_proj.grad is not None
    assert ex.gate_up_proj.grad[5].abs().sum() == 0 and ex.down_proj.grad[5].abs().sum() == 0
    assert ex.gate_up_proj.grad[0].abs().sum() > 0
    ex.requires_grad_(False)  # freeze: only the input gradient is asked for
    out, _ = LocalDispatcher()(x, idx, w.detach(), ex, E, None)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    (want,) = torch.autograd.grad(naive_moe(x, idx, w.detach(), ex, None).sum(), [x])
    assert_close(gx, want, "input gradient through frozen experts")
    # train.freeze=experts still trains the router: the routing weights' gradient through frozen experts
    out, _ = LocalDispatcher()(x, idx, w, ex, E, None)
    gx, gw = torch.autograd.grad(out.sum(), [x, w])
    want_x, want_w = torch.autograd.grad(naive_moe(x, idx, w, ex, None).sum(), [x, w])
    assert_close(gx, want_x, "input gradient through frozen experts, router trained")
    assert_close(gw, want_w, "routing-weight gradient through frozen experts")


@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_to_one_expert_and_empty_batch(impl: str) -> None:
    skip_unsupported(impl)
    ex = make_experts(impl=impl)
    x = torch.randn(T, H, requires_grad=True)
    idx = torch.zeros(T, 1, dtype=torch.long)
    w = torch.ones(T, 1, requires_grad=True)
    out, _ = LocalDispatcher()(x, idx, w, ex, E, None)
    assert_matches(out, naive_moe(x, idx, w, ex, None), [x, w, ex.gate_up_proj, ex.down_proj])
    x0 = torch.randn(0, H, requires_grad=True)
    out0, _ = LocalDispatcher()(x0, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), ex, E, None)
    assert out0.shape == (0, H)


def test_counts_that_do_not_cover_the_rows_are_rejected() -> None:
    ex = make_experts()
    with pytest.raises(ValueError, match="counts_E sums to"):
        ex(torch.randn(10, H), torch.tensor([3, 3, 0, 0, 0, 0, 0, 0]))


def test_plan_routing_keeps_first_choices_first() -> None:
    idx, _ = routing(2, unused_expert=None)
    plan = plan_routing(idx, E, capacity=10)
    kept = kept_assignments(idx, 10)
    assert sorted(plan.order.tolist()) == sorted(j * T + t for t, j in kept)
    expert_S = idx.t().reshape(-1)[plan.order]
    assert torch.equal(expert_S, expert_S.sort(stable=True).values)  # sorted by expert
    assert torch.equal(plan.counts_E, torch.bincount(expert_S, minlength=E))


def test_grouped_mm_impl_equals_naive_on_cpu() -> None:
    """impl="grouped_mm" (torch._grouped_mm) runs forward and backward on CPU in fp32 too."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    ex = make_experts(impl="grouped_mm")
    x = torch.randn(T, H, requires_grad=True)
    idx, w = routing(2)
    out, _ = LocalDispatcher()(x, idx, w, ex, E, None)
    assert_matches(out, naive_moe(x, idx, w, ex, None), [x, w, ex.gate_up_proj, ex.down_proj])


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_moe_layer_equals_naive(capacity_factor: float | None) -> None:
    """Whole layer (router included): output, and gradients of input, router and experts."""
    cfg = tiny_model_config(hidden_size=H, intermediate_size=INTER, capacity_factor=capacity_factor)
    layer = MoELayer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.25)
    x = torch.randn(2, T // 2, H, requires_grad=True)
    y, stats = layer(x)
    route = layer.router(x.reshape(-1, H))
    ref = naive_moe(
        x.reshape(-1, H), route.topk_idx_TK, route.topk_weight_TK, layer.experts, layer.capacity(T)
    )
    leaves = [x, layer.router.weight, layer.experts.gate_up_proj, layer.experts.down_proj]
    assert_matches(y.reshape(-1, H), ref, leaves)
    assert int(stats.dropped) == T * cfg.top_k - len(kept_assignments(route.topk_idx_TK, layer.capacity(T)))


@pytest.mark.parametrize("threads", [2, 3])
def test_loop_paths_sliced_over_threads_equal_naive(
    threads: int, group_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several torch threads the loop paths run slices of experts on separate threads."""
    used: list[int] = []

    def spy(*args: object) -> list[tuple[int, int]]:
        got = slices(*args)  # type: ignore[arg-type]
        used.append(len(got))
        return got

    monkeypatch.setattr(expert_threads, "slices", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ex = make_experts(dtype=torch.float64)
        x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
        idx, w = routing(2, dtype=torch.float64)
        out, _ = LocalDispatcher()(x, idx, w, ex, E, None)
        assert_matches(out, naive_moe(x, idx, w, ex, None), [x, w, ex.gate_up_proj, ex.down_proj])
        plan = plan_routing(idx, E, None)
        out = combine(ex(x[plan.token_idx], plan.counts_E), plan, w, T)
        assert_matches(out, naive_moe(x, idx, w, ex, None), [x, w, ex.gate_up_proj, ex.down_proj])
        assert torch.get_num_threads() == threads  # restored after the slices ran
        assert used and (max(used) > 1) == (group_rows < T)  # one group: nothing to split
    finally:
        torch.set_num_threads(before)


def test_slices_cut_only_where_allowed_and_balance_rows() -> None:
    rows = [100, 100, 100, 100, 50, 50, 300]
    can_cut = [True, True, False, True, True, False, True]
    got = slices(rows, can_cut, 3)
    assert got[0][0] == 0 and got[-1][1] == len(rows)
    assert all(a == prev_b for (_, prev_b), (a, _) in zip(got, got[1:]))  # contiguous, complete
    assert all(can_cut[a] for a, _ in got[1:])
    assert len(got) == 3
    assert max(sum(rows[a:b]) for a, b in got) <= 400  # no slice holds more than needed
    assert slices(rows, [True] + [False] * 6, 4) == [(0, 7)]  # nowhere to cut: one slice
    assert slices([], [], 2) == []
