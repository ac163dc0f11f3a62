"""Model semantics against hand-built references: router, dispatch, MoE layer, transformer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_lm.model.dispatch import LocalDispatcher, plan_routing
from moe_lm.model.experts import Experts
from moe_lm.model.layers import SwiGLU
from moe_lm.model.losses import load_balance_loss, z_loss
from moe_lm.model.moe import MoELayer
from moe_lm.model.router import Router
from moe_lm.model.transformer import MoETransformer
from tests.conftest import tiny_model_config


def _expert_ref(experts: Experts, e: int, x_H: torch.Tensor) -> torch.Tensor:
    """One expert on one token, spelled out: down(silu(gate x) * up x)."""
    inter = experts.intermediate_size
    gate_IH, up_IH = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
    return experts.down_proj[e] @ (F.silu(gate_IH @ x_H) * (up_IH @ x_H))


def _naive_moe(
    experts: Experts,
    x_TH: torch.Tensor,
    idx_TK: torch.Tensor,
    w_TK: torch.Tensor,
    kept: set[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """sum over k of w * expert_e(x), token by token; (token, slot) pairs not in `kept` add 0."""
    out = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for s in range(idx_TK.shape[1]):
            if kept is None or (t, s) in kept:
                out[t] += w_TK[t, s] * _expert_ref(experts, int(idx_TK[t, s]), x_TH[t])
    return out


def _random_experts(num_experts: int = 4, hidden: int = 8, inter: int = 6, impl: str = "loop") -> Experts:
    experts = Experts(num_experts, hidden, inter, impl)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.5)
    torch.nn.init.normal_(experts.down_proj, std=0.5)
    return experts


# ------------------------------------------------------------------------------------------- router


def test_router_matches_reference_in_fp32() -> None:
    router = Router(hidden_size=16, num_experts=6, top_k=2).to(torch.bfloat16)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    route = router(x)
    logits = x.float() @ router.weight.float().t()
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = torch.topk(probs, 2, dim=-1)
    assert route.logits_TE.dtype == route.probs_TE.dtype == route.topk_weight_TK.dtype == torch.float32
    torch.testing.assert_close(route.probs_TE, probs)
    assert torch.equal(route.topk_idx_TK, top_i)
    torch.testing.assert_close(route.topk_weight_TK, top_w / top_w.sum(-1, keepdim=True))
    torch.testing.assert_close(route.topk_weight_TK.sum(-1), torch.ones(10))
    assert bool((route.topk_weight_TK[:, 0] >= route.topk_weight_TK[:, 1]).all())  # best first


def test_router_jitter_only_in_train_mode() -> None:
    router = Router(hidden_size=8, num_experts=4, top_k=2, jitter=0.5)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(32, 8)
    clean = x @ router.weight.t()
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, clean)
    router.train()
    first, second = router(x).logits_TE, router(x).logits_TE
    assert not torch.allclose(first, clean) and not torch.allclose(first, second)


def test_aux_free_bias_changes_choice_not_gates() -> None:
    router = Router(hidden_size=8, num_experts=4, top_k=2, aux_free_bias=True)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(20, 8)
    before = router(x)
    assert router.expert_bias is not None
    loser = int(before.probs_TE.mean(0).argmin())
    router.expert_bias[loser] = 10.0  # larger than any probability gap: always picked
    after = router(x)
    torch.testing.assert_close(after.probs_TE, before.probs_TE)
    assert bool((after.topk_idx_TK == loser).any(-1).all())
    gates = before.probs_TE.gather(1, after.topk_idx_TK)  # unbiased probs of the chosen experts
    torch.testing.assert_close(after.topk_weight_TK, gates / gates.sum(-1, keepdim=True))


def test_update_bias_lowers_overloaded_expert() -> None:
    router = Router(hidden_size=8, num_experts=4, top_k=1, aux_free_bias=True)
    router.update_bias(torch.tensor([10, 2, 2, 2]), rate=0.1)  # mean 4: expert 0 over, others under
    assert router.expert_bias is not None
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    model = MoETransformer(tiny_model_config(aux_free_bias=True, aux_free_update_rate=0.5))
    model.update_expert_bias(torch.tensor([[1, 1, 1, 1, 1, 1, 1, 9], [9, 1, 1, 1, 1, 1, 1, 1]]))
    biases = [layer.router.expert_bias for layer in model.moe_layers]
    assert biases[0] is not None and biases[1] is not None
    assert biases[0][7].item() == pytest.approx(-0.5) and biases[0][0].item() == pytest.approx(0.5)
    assert biases[1][0].item() == pytest.approx(-0.5) and biases[1][7].item() == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------- dispatch

# T=4, E=2, k=2. Slot-major queue: slot 0 -> experts [0, 0, 1, 0], then slot 1 -> [1, 1, 0, 1].
HAND_IDX = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
# capacity 2: expert 0 keeps (t0,s0), (t1,s0); expert 1 keeps (t2,s0) -- a first choice, even though
# t0's and t1's second choices come from earlier tokens -- then (t0,s1). Four assignments dropped.
HAND_KEPT = {(0, 0), (1, 0), (2, 0), (0, 1)}


@pytest.mark.parametrize(
    ("cf", "tokens", "k", "e", "cap"),
    [(1.0, 8, 2, 8, 2), (1.25, 10, 2, 8, 4), (0.5, 4, 2, 2, 2), (2.0, 7, 1, 4, 4)],
)
def test_capacity_formula(cf: float, tokens: int, k: int, e: int, cap: int) -> None:
    layer = MoELayer(tiny_model_config(capacity_factor=cf, top_k=k, num_experts=e))
    assert layer.capacity(tokens) == cap
    assert MoELayer(tiny_model_config()).capacity(tokens) is None  # dropless by default


def test_plan_routing_keeps_first_choices_first() -> None:
    plan = plan_routing(HAND_IDX, num_experts=2, capacity=2)
    assert plan.dropped.item() == 4
    assert plan.counts_E.tolist() == [2, 2]
    # flat index = slot * T + token: kept (0,0) (1,0) | (2,0) (0,1) -> 0, 1 | 2, 4
    assert plan.order.tolist() == [0, 1, 2, 4]
    assert plan.token_idx.tolist() == [0, 1, 2, 0]
    dropless = plan_routing(HAND_IDX, num_experts=2, capacity=None)
    assert dropless.dropped.item() == 0 and dropless.counts_E.tolist() == [4, 4]


def test_local_dispatcher_dropless_matches_naive_loop() -> None:
    experts = _random_experts()
    x = torch.randn(12, 8)
    w = torch.softmax(torch.randn(12, 2), -1)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(12)])
    y, dropped = LocalDispatcher()(x, idx, w, experts, 4, None)
    assert dropped.item() == 0
    torch.testing.assert_close(y, _naive_moe(experts, x, idx, w), rtol=1e-5, atol=1e-5)


def test_local_dispatcher_capacity_matches_naive_loop() -> None:
    experts = _random_experts(num_experts=2)
    x = torch.randn(4, 8)
    w = torch.softmax(torch.randn(4, 2), -1)
    y, dropped = LocalDispatcher()(x, HAND_IDX, w, experts, 2, 2)
    assert dropped.item() == 4
    ref = _naive_moe(experts, x, HAND_IDX, w, kept=HAND_KEPT)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[3], torch.zeros(8))  # both of token 3's assignments dropped


@pytest.mark.parametrize("impl", ["loop", "auto", "grouped_mm"])
def test_experts_impl_matches_reference(impl: str) -> None:
    # torch._grouped_mm wants 16-byte aligned row strides, hence inter=8 (fp32) rather than 6.
    experts = _random_experts(inter=8, impl=impl)
    counts = torch.tensor([3, 0, 5, 2])  # includes an expert with no tokens
    x = torch.randn(10, 8)
    owner = torch.repeat_interleave(torch.arange(4), counts)
    ref = torch.stack([_expert_ref(experts, int(owner[n]), x[n]) for n in range(10)])
    with torch.no_grad():  # grouped_mm has no CPU backward; the forward is what is compared
        torch.testing.assert_close(experts(x, counts), ref, rtol=1e-5, atol=1e-5)


def test_loop_experts_backward_matches_autograd_reference() -> None:
    # The loop impl has a hand-written backward: its grads must equal autograd through the naive
    # per-token reference, including zeros for an expert that received no tokens.
    experts = _random_experts(impl="loop").double()
    counts = torch.tensor([3, 0, 5, 2])
    owner = torch.repeat_interleave(torch.arange(4), counts)
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(10, 8, dtype=torch.float64)
    (experts(x, counts) * dy).sum().backward()
    got = [t.grad.clone() for t in (x, experts.gate_up_proj, experts.down_proj)]  # type: ignore[union-attr]
    for t in (x, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    ref = torch.stack([_expert_ref(experts, int(owner[n]), x[n]) for n in range(10)])
    (ref * dy).sum().backward()
    want = [t.grad for t in (x, experts.gate_up_proj, experts.down_proj)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert not got[1][1].any() and not got[2][1].any()


def test_shared_experts_add_dense_ffn() -> None:
    cfg = tiny_model_config(num_shared_experts=2, moe_intermediate_size=16)
    layer = MoELayer(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    assert isinstance(layer.shared, SwiGLU) and layer.shared.intermediate_size == 32  # 2 x 16
    x = torch.randn(2, 5, cfg.hidden_size)
    y, _ = layer(x)
    x_TH = x.reshape(-1, cfg.hidden_size)
    route = layer.router(x_TH)
    routed = _naive_moe(layer.experts, x_TH, route.topk_idx_TK, route.topk_weight_TK)
    torch.testing.assert_close(
        y.reshape(-1, cfg.hidden_size), routed + layer.shared(x_TH), rtol=1e-4, atol=1e-5
    )


def test_moe_layer_stats() -> None:
    layer = MoELayer(tiny_model_config(capacity_factor=0.5))
    torch.nn.init.normal_(layer.router.weight)
    x = torch.randn(3, 8, 64)
    _, stats = layer(x)
    route = layer.router(x.reshape(-1, 64))
    counts = torch.bincount(route.topk_idx_TK.reshape(-1), minlength=8)
    assert stats.num_tokens == 24 and torch.equal(stats.counts_E, counts)
    cap = math.ceil(0.5 * 24 * 2 / 8)
    assert stats.dropped.item() == int((counts - cap).clamp(min=0).sum())
    torch.testing.assert_close(stats.aux_loss, load_balance_loss(route.probs_TE, counts, 2))
    torch.testing.assert_close(stats.z_loss, z_loss(route.logits_TE))


def test_padding_is_not_routed_and_not_counted() -> None:
    # Under a mask the layer equals the same layer run on the real tokens alone: capacity, drops,
    # counts, aux and z losses; padding gets no FFN output.
    layer = MoELayer(tiny_model_config(capacity_factor=0.5, num_shared_experts=1))
    for p in layer.parameters():  # the layer alone is not initialised (MoETransformer does that)
        torch.nn.init.normal_(p, std=0.1)
    torch.nn.init.normal_(layer.router.weight)
    x = torch.randn(3, 8, 64)
    real = torch.ones(3, 8, dtype=torch.bool)
    real[1, 5:] = False
    real[2, :6] = False
    y, stats = layer(x, real)
    y_ref, ref = layer(x[real][None])
    assert stats.num_tokens == ref.num_tokens == 15 and stats.dropped.item() == ref.dropped.item() > 0
    assert torch.equal(stats.counts_E, ref.counts_E)
    for name in ("aux_loss", "z_loss", "probs_mean_E"):
        torch.testing.assert_close(getattr(stats, name), getattr(ref, name), rtol=0, atol=0)
    torch.testing.assert_close(y[real], y_ref[0])
    assert not y[~real].any()


# -------------------------------------------------------------------------------------- transformer


def test_dense_layers_have_no_router() -> None:
    model = MoETransformer(tiny_model_config(num_layers=4, moe_layer_freq=2))
    assert [b.is_moe for b in model.layers] == [False, True, False, True]
    model = MoETransformer(tiny_model_config(num_layers=3, first_dense_layers=1))
    assert [b.is_moe for b in model.layers] == [False, True, True]
    dense = model.layers[0]
    assert isinstance(dense.ffn, SwiGLU)
    assert not any(isinstance(m, Router) for m in dense.modules())
    out = model(torch.randint(0, 128, (1, 6)))
    assert out.expert_counts_LE is not None and out.expert_counts_LE.shape == (2, 8)


def test_tied_embeddings_share_storage() -> None:
    ids = torch.tensor([[1, 2, 3, 4]])  # token 9 is never an input: its row only feeds the head
    tied = MoETransformer(tiny_model_config(tie_embeddings=True)).eval()
    untied = MoETransformer(tiny_model_config(tie_embeddings=False)).eval()
    assert tied.lm_head is None and untied.lm_head is not None
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()
    n_tied, n_untied = (sum(p.numel() for p in m.parameters()) for m in (tied, untied))
    assert n_untied - n_tied == 128 * 64
    for model, changes in ((tied, True), (untied, False)):
        before = model(ids).logits
        with torch.no_grad():
            model.embed.weight[9] += 1.0
        after = model(ids).logits
        assert before is not None and after is not None
        assert torch.equal(before[..., :9], after[..., :9])
        assert (not torch.equal(before[..., 9], after[..., 9])) == changes


def test_kv_cache_matches_full_recompute() -> None:
    model = MoETransformer(tiny_model_config()).eval()
    ids = torch.randint(0, 128, (2, 10))
    full = model(ids).logits
    out = model(ids[:, :4])
    steps = [out.logits]
    for t in range(4, 10):
        out = model(ids[:, t : t + 1], cache=out.cache)
        steps.append(out.logits)
    assert full is not None
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_generate_is_deterministic_and_matches_recompute() -> None:
    model = MoETransformer(tiny_model_config()).eval()
    prompt = torch.randint(0, 128, (2, 3))
    a = model.generate(prompt, max_new_tokens=6, temperature=0)
    b = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert torch.equal(a, b) and a.shape == (2, 9) and torch.equal(a[:, :3], prompt)
    tokens = prompt
    for _ in range(6):  # no cache: recompute the whole sequence for every new token
        logits = model(tokens).logits
        assert logits is not None
        tokens = torch.cat((tokens, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(a, tokens)


def test_causal_future_token_does_not_change_past() -> None:
    model = MoETransformer(tiny_model_config()).eval()
    ids = torch.randint(0, 128, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % 128
    a, b = model(ids).logits, model(changed).logits
    assert a is not None and b is not None
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 8], b[:, 8])


def test_padding_mask_right_and_left() -> None:
    model = MoETransformer(tiny_model_config()).eval()
    real = torch.randint(1, 128, (1, 6))
    alone = model(real).logits
    long = torch.randint(1, 128, (1, 10))
    right = torch.cat((real, torch.zeros(1, 4, dtype=torch.long)), dim=1)
    mask = torch.tensor([[1] * 10, [1] * 6 + [0] * 4])
    out = model(torch.cat((long, right)), attention_mask=mask).logits
    assert alone is not None and out is not None
    torch.testing.assert_close(out[1:, :6], alone, rtol=1e-5, atol=1e-5)
    # Left padding needs explicit positions so the real tokens start at position 0.
    left = torch.cat((torch.zeros(1, 4, dtype=torch.long), real), dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 6])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(left, attention_mask=mask, position_ids=pos).logits
    assert out is not None
    torch.testing.assert_close(out[:, 4:], alone, rtol=1e-5, atol=1e-5)


def test_loss_combines_lm_aux_and_z() -> None:
    cfg = tiny_model_config(aux_loss_coef=0.3, z_loss_coef=0.05)
    model = MoETransformer(cfg)
    routes = []
    for layer in model.moe_layers:
        layer.router.register_forward_hook(lambda _m, _i, r: routes.append(r))
    ids = torch.randint(0, 128, (2, 8))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = model(ids, labels=labels)
    assert out.logits is not None and out.loss is not None
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    auxes = [
        load_balance_loss(r.probs_TE, torch.bincount(r.topk_idx_TK.reshape(-1), minlength=8), 2)
        for r in routes
    ]
    aux = torch.stack(auxes).mean()
    z = torch.stack([z_loss(r.logits_TE) for r in routes]).mean()
    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.z_loss, z)
    torch.testing.assert_close(out.loss, lm + 0.3 * aux + 0.05 * z)


def test_backward_gives_finite_grads_everywhere() -> None:
    cfg = tiny_model_config(num_shared_experts=1, num_layers=3, first_dense_layers=1)
    model = MoETransformer(cfg)
    ids = torch.randint(0, 128, (4, 16))  # 64 tokens x 2 choices: every expert gets some
    out = model(ids, labels=ids)
    assert out.loss is not None
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert p.grad.abs().sum() > 0, name
    for layer in model.moe_layers:  # every expert of every layer received gradient
        assert bool((layer.experts.down_proj.grad.abs().sum(dim=(1, 2)) > 0).all())  # type: ignore[union-attr]


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_activation_checkpointing_same_loss_and_grads(jitter: float) -> None:
    # With jitter the recomputation must replay the same noise (checkpoint restores the RNG state),
    # or the backward pass would route differently from the forward pass.
    cfg = tiny_model_config(capacity_factor=1.0, router_jitter=jitter)
    ids = torch.randint(0, 128, (2, 12))
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = MoETransformer(cfg).train()
        model.activation_checkpointing = ckpt
        torch.manual_seed(1)
        out = model(ids, labels=ids)
        assert out.loss is not None
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-6, atol=1e-6, msg=name)
