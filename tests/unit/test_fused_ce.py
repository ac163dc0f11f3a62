"""The chunked head + cross-entropy equals the plain path: loss and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lm.model import MoETransformer
from moe_lm.model.fused_ce import chunked_linear_cross_entropy
from tests.conftest import tiny_model_config


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_matches_linear_then_cross_entropy_with_ignored_labels(chunk: int) -> None:
    x = torch.randn(150, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (150,))
    labels[::5] = -100
    ref = F.cross_entropy(x @ w.t(), labels, ignore_index=-100)
    ref_gx, ref_gw = torch.autograd.grad(3.0 * ref, (x, w))
    got = chunked_linear_cross_entropy(x, w, labels, chunk)
    gx, gw = torch.autograd.grad(3.0 * got, (x, w))  # a non-unit upstream gradient is applied
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gx, ref_gx, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gw, ref_gw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_model_training_step_is_the_same_without_logits(tied: bool) -> None:
    model = MoETransformer(tiny_model_config(tie_embeddings=tied, init_std=0.1)).train()
    ids = torch.randint(0, 128, (3, 33))
    labels = ids[:, 1:].clone()
    labels[0, :5] = -100
    grads = []
    losses = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(ids[:, :-1], labels=labels, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        assert out.loss is not None
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name


def test_without_gradients_the_logits_are_kept() -> None:
    model = MoETransformer(tiny_model_config()).eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        out = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
    assert out.logits is not None and out.lm_loss is not None
