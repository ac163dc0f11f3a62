"""Output projection + cross-entropy in row chunks, for training: the [tokens, vocab] logits never exist.

The gradients of the mean loss with respect to the hidden states and the head weight are made in
the forward pass, chunk by chunk (softmax - onehot, scaled), so peak memory holds one chunk of
logits instead of all of them; backward only scales them by the incoming gradient. fp32 only: under
autocast the model uses the plain path.
"""

from __future__ import annotations

from typing import Any

import torch


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        acc = torch.promote_types(x_NH.dtype, torch.float32)  # at least fp32 for the softmax
        valid_N = labels_N != -100
        inv_count = 1.0 / valid_N.sum().clamp_min(1).to(acc)
        grad_x_NH = torch.empty_like(x_NH)
        grad_w_VH = torch.zeros_like(w_VH)
        total = x_NH.new_zeros((), dtype=acc)
        for start in range(0, x_NH.shape[0], chunk):
            x_cH = x_NH[start : start + chunk]
            labels_c = labels_N[start : start + chunk]
            valid_c = valid_N[start : start + chunk]
            safe_c = labels_c.clamp_min(0)
            logits_cV = (x_cH @ w_VH.t()).to(acc)
            lse_c = torch.logsumexp(logits_cV, dim=-1)
            target_c = logits_cV.gather(1, safe_c[:, None]).squeeze(1)
            total += ((lse_c - target_c) * valid_c).sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / count; zero on ignored rows
            g_cV = logits_cV.sub_(lse_c[:, None]).exp_()
            g_cV.scatter_add_(1, safe_c[:, None], torch.full_like(target_c, -1.0)[:, None])
            g_cV.mul_((valid_c.to(acc) * inv_count)[:, None])
            g_cV = g_cV.to(x_NH.dtype)
            torch.mm(g_cV, w_VH, out=grad_x_NH[start : start + chunk])
            grad_w_VH.addmm_(g_cV.t(), x_cH)
        ctx.save_for_backward(grad_x_NH, grad_w_VH)
        return total * inv_count

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:  # type: ignore[override]
        grad_x_NH, grad_w_VH = ctx.saved_tensors
        return grad_x_NH * grad_out, grad_w_VH * grad_out, None, None


def chunked_linear_cross_entropy(
    x_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """mean over labels != -100 of cross_entropy(x @ w.T, labels), computed `chunk` rows at a time."""
    return _ChunkedLinearCrossEntropy.apply(x_NH, w_VH, labels_N, chunk)  # type: ignore[no-any-return]
