"""model.aux_loss_scope: global_batch in one process: accumulation equals one big batch, the
counting pass replays router jitter, and the seam sums each layer's counts once per step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_lm.model import MoETransformer
from moe_lm.model.balance import global_batch_step
from tests.conftest import tiny_model_config

MICRO, SEQ, ACCUM = 2, 16, 4


def _model(scope: str, **overrides: Any) -> MoETransformer:
    torch.manual_seed(0)
    # aux_loss_coef 1: the balance loss's gradient is as large as the LM loss's, so a wrong f shows.
    cfg = tiny_model_config(aux_loss_scope=scope, aux_loss_coef=1.0, **overrides)
    model = MoETransformer(cfg)
    model.train()
    return model


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # Two "domains": the first half of the global batch uses low token ids, the second high ones,
    # so micro-batches differ in routing and per-micro-batch balancing differs from global.
    out = []
    for m in range(ACCUM):
        low, high = (0, 64) if m < ACCUM // 2 else (64, 128)
        ids = torch.randint(low, high, (MICRO, SEQ + 1), generator=g)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _count(model: MoETransformer) -> Any:
    return lambda batch: model.route_counts(batch[0])


def _accumulated(model: MoETransformer, batches: list[Any]) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(mean loss, mean aux loss, gradients) of one optimizer step over `batches`, as the trainer runs it."""
    loss = aux = 0.0
    with global_batch_step(model, batches, _count(model)):
        for ids, labels in batches:
            out = model(ids, labels)
            (out.loss / len(batches)).backward()
            loss += float(out.loss.detach()) / len(batches)
            aux += float(out.aux_loss.detach()) / len(batches)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, aux, grads


def _whole(model: MoETransformer, batches: list[Any]) -> tuple[float, float, dict[str, torch.Tensor]]:
    ids = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    return _accumulated(model, [(ids, labels)])


def _max_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_accumulation_equals_one_process_holding_the_whole_batch() -> None:
    batches = _batches()
    loss_ref, aux_ref, grads_ref = _whole(_model("global_batch"), batches)
    loss, aux, grads = _accumulated(_model("global_batch"), batches)
    assert abs(loss - loss_ref) < 1e-5 and abs(aux - aux_ref) < 1e-5
    assert _max_err(grads, grads_ref) < 1e-5
    # The same split balanced per micro-batch is a different loss: the comparison above can fail.
    _, aux_micro, grads_micro = _accumulated(_model("micro_batch"), batches)
    assert abs(aux_micro - aux_ref) > 1e-3
    router = [n for n in grads_ref if n.endswith("router.weight")]
    assert max(float((grads_micro[n] - grads_ref[n]).abs().max()) for n in router) > 1e-3


def test_one_big_batch_is_the_same_under_both_scopes() -> None:
    batches = _batches()
    global_ = _whole(_model("global_batch"), batches)
    micro = _whole(_model("micro_batch"), batches)
    assert global_[:2] == pytest.approx(micro[:2], abs=1e-6)
    assert _max_err(global_[2], micro[2]) < 1e-6


def test_counting_pass_replays_router_jitter() -> None:
    # Jitter draws noise in every training pass. The counting pass must see the noise the passes
    # after it see, or the counts it fixes for the step are not the step's routing.
    model = _model("global_batch", router_jitter=0.5)
    batches = _batches()
    seen: list[torch.Tensor] = []
    original = model.balance.step

    def spy(counts_LE: torch.Tensor | None = None) -> Any:
        seen.append(counts_LE.clone())
        return original(counts_LE)

    model.balance.step = spy  # type: ignore[method-assign]
    torch.manual_seed(5)
    with global_batch_step(model, batches, _count(model)):
        routed = sum(model(ids, labels).expert_counts_LE for ids, labels in batches)
    assert torch.equal(seen[0], routed)
    # ... and the jitter matters: another draw routes differently.
    torch.manual_seed(6)
    other = sum(model(ids, labels).expert_counts_LE for ids, labels in batches)
    assert not torch.equal(other, routed)


class _OtherRanks:
    """A stand-in for the all-reduce: adds fixed counts, as if other ranks had routed them."""

    def __init__(self, other_E: torch.Tensor) -> None:
        self.other_E, self.calls = other_E, 0

    def __call__(self, counts: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return counts + self.other_E


def _router_probs(model: MoETransformer) -> tuple[list[torch.Tensor], list[Any]]:
    """Capture every router's probabilities as passes run (forward hooks)."""
    probs: list[torch.Tensor] = []
    hooks = [
        layer.router.register_forward_hook(lambda m, i, out: probs.append(out.probs_TE.detach()))
        for layer in model.moe_layers
    ]
    return probs, hooks


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_micro_batch_sums_each_layer_once_per_step(checkpointing: bool) -> None:
    model = _model("global_batch")
    model.activation_checkpointing = checkpointing
    other = torch.tensor([40, 0, 0, 0, 0, 0, 0, 24])
    reduce = _OtherRanks(other)
    model.balance.reduce = reduce
    ids, labels = _batches()[0]
    probs, hooks = _router_probs(model)
    with global_batch_step(model, [(ids, labels)], _count(model)):
        out = model(ids, labels)
        out.loss.backward()
    for hook in hooks:
        hook.remove()
    layers = len(model.moe_layers)
    assert reduce.calls == layers  # once per layer: not again in the recomputation
    assert len(probs) == (2 * layers if checkpointing else layers)
    # The aux loss is E * sum_i f_i P_i, f from this rank's counts plus the other ranks'.
    expected = {"global": 0.0, "this rank": 0.0}
    for probs_TE, counts_E in zip(probs, out.expert_counts_LE):
        for name, total in (("global", counts_E + other), ("this rank", counts_E)):
            f_E = total.double() / total.sum()
            expected[name] += 8 * float((f_E * probs_TE.double().mean(0)).sum()) / layers
    aux = float(out.aux_loss.detach())
    assert aux == pytest.approx(expected["global"], rel=1e-6)
    assert abs(aux - expected["this rank"]) > 1e-3  # a router near uniform: P_i ≈ 1/E


def test_passes_without_autograd_stay_per_micro_batch() -> None:
    global_, micro = _model("global_batch"), _model("micro_batch")
    reduce = _OtherRanks(torch.full((8,), 1000))
    global_.balance.reduce = reduce
    ids, labels = _batches()[0]
    with torch.no_grad():
        assert float(global_(ids, labels).aux_loss) == float(micro(ids, labels).aux_loss)
    assert reduce.calls == 0  # evaluation never communicates


def test_route_counts_equal_the_forward_counts() -> None:
    model = _model("micro_batch", first_dense_layers=1, num_layers=3)
    ids, labels = _batches()[0]
    with torch.no_grad():
        assert torch.equal(model.route_counts(ids), model(ids, labels).expert_counts_LE)
    dense = MoETransformer(tiny_model_config(first_dense_layers=2))
    assert dense.route_counts(ids).shape == (0, 8)
