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
        # One [chunk, V] buffer for every chunk: a fresh multi-MiB tensor per chunk is a fresh mmap
        # whose pages fault in, which cost more than the softmax itself (bench_train's profile).
        logits_cV = x_NH.new_empty(min(chunk, x_NH.shape[0]), w_VH.shape[0], dtype=acc)
        w_acc = w_VH.to(acc)
        for start in range(0, x_NH.shape[0], chunk):
            x_cH = x_NH[start : start + chunk]
            rows = x_cH.shape[0]
            labels_c = labels_N[start : start + chunk]
            scale_c1 = (valid_N[start : start + chunk].to(acc) * inv_count)[:, None]
            safe_c1 = labels_c.clamp_min(0)[:, None]
            # softmax in place, one exp pass: e = exp(z - max), lse = max + log(sum e)
            e_cV = torch.mm(x_cH.to(acc), w_acc.t(), out=logits_cV[:rows])
            target_c1 = e_cV.gather(1, safe_c1)
            max_c1 = e_cV.amax(dim=1, keepdim=True)
            sum_c1 = e_cV.sub_(max_c1).exp_().sum(dim=1, keepdim=True)
            lse_c1 = max_c1 + sum_c1.log()
            total += ((lse_c1 - target_c1) * scale_c1).sum()
            # d(mean loss)/d(logits) = (softmax - onehot) / count; zero on ignored rows
            g_cV = e_cV.mul_(scale_c1 / sum_c1)
            g_cV.scatter_add_(1, safe_c1, -scale_c1)
            g_cV = g_cV.to(x_NH.dtype)
            torch.mm(g_cV, w_VH, out=grad_x_NH[start : start + chunk])
            grad_w_VH.addmm_(g_cV.t(), x_cH)
        ctx.save_for_backward(grad_x_NH, grad_w_VH)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:  # type: ignore[override]
        grad_x_NH, grad_w_VH = ctx.saved_tensors
        return grad_x_NH * grad_out, grad_w_VH * grad_out, None, None


def chunked_linear_cross_entropy(
    x_NH: torch.Tensor, w_VH: torch.Tensor, labels_N: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """mean over labels != -100 of cross_entropy(x @ w.T, labels), computed `chunk` rows at a time."""
    return _ChunkedLinearCrossEntropy.apply(x_NH, w_VH, labels_N, chunk)  # type: ignore[no-any-return]
