"""One optimizer step, as a function of the backend and the step's micro-batches: what `Trainer`
runs every step, and what a rehearsal (moe_lm/plan) runs on fake tensors to size a job.

One optimizer step = grad_accum_steps micro-batches on every data-parallel rank. The loss of a
micro-batch is lm + aux_coef * mean_layers(aux) + z_coef * mean_layers(z), divided by the number of
micro-batches so gradients are means over the global batch. Packed conversations instead weigh
each micro-batch's LM term by its share of the step's target tokens and its router terms by its
share of the step's routed (not padding) tokens (lm_weights), so the LM loss is the mean over every
assistant token of the step, on every process, and the router terms the mean over its real tokens.
The step reads nothing from the device except through the routing counts' seam
(moe_lm/model/split_sizes.py), the backend's step (the gradient norm and whether it was finite)
and, for packed rows with padding, the selection of the real tokens to route (moe_lm/model/moe.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moe_lm import faults
from moe_lm.config import Config
from moe_lm.data.blocks import batch_document_ids
from moe_lm.model.balance import global_batch_step
from moe_lm.parallel.backend import Backend

Batch = Sequence[torch.Tensor]  # (input_ids, labels) on the CPU; moe_lm.data.blocks.Batch for packed rows


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured on this process, before any reduction over processes."""

    # loss, lm_loss, aux_loss, hf_aux_loss, z_loss (those the model returned): 0-dim float32
    # tensors on the device, means over the step's micro-batches.
    losses: dict[str, torch.Tensor]
    expert_counts_LE: torch.Tensor | None  # tokens each MoE layer routed to each expert (None: no MoE layer)
    dropped_L: torch.Tensor | None  # per MoE layer, tokens dropped by the capacity limit
    grad_norm: float  # global, before clipping
    stepped: bool  # False: the norm was not finite and the update was skipped
    seconds: float  # wall-clock time of the step
    router_entropy_L: torch.Tensor | None = (
        None  # per MoE layer, mean router entropy (nats) over the micro-batches
    )
    target_tokens: torch.Tensor | None = None  # packed conversations: the step's targets, every process

    @property
    def finite(self) -> bool:
        loss = self.losses.get("loss")
        return self.stepped and (loss is None or bool(torch.isfinite(loss)))


def forward(
    cfg: Config, device: torch.device, eos_id: int, model: Any, batch: Batch | torch.Tensor,
    labels: torch.Tensor | None = None, **kwargs: Any,
) -> Any:  # fmt: skip
    """`model` (wrapped for training, raw for evaluation) on a batch from the CPU: the loader's
    (input_ids, labels) pair (moe_lm.data.blocks.Batch), or input_ids and `labels`."""
    pair: Batch = batch if labels is None else (batch, labels)  # type: ignore[assignment]
    docs = batch_document_ids(pair, eos_id, cfg.data.document_mask)
    if docs is not None:
        kwargs["document_ids"] = docs.to(device)
    real = getattr(pair, "real_BT", None)  # packed rows' padding: routed to no expert
    if real is not None:
        kwargs["attention_mask"] = real.to(device)
    return model(pair[0].to(device), labels=pair[1].to(device), **kwargs)


def count_routes(backend: Backend, cfg: Config, eos_id: int, batch: Batch) -> torch.Tensor:
    """Expert counts [L, E] of one micro-batch, without autograd or LM head (the counting pass
    of model.aux_loss_scope global_batch, moe_lm/model/balance.py)."""
    docs = batch_document_ids(batch, eos_id, cfg.data.document_mask)
    real = getattr(batch, "real_BT", None)
    with backend.autocast():
        return backend.raw_model.route_counts(
            batch[0].to(backend.device),
            attention_mask=None if real is None else real.to(backend.device),
            document_ids=None if docs is None else docs.to(backend.device),
        )


def lm_weights(
    backend: Backend, batches: Sequence[Batch]
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Packed conversations: per micro-batch, the factor n_m * W / N on its lm_loss (its mean over
    its n_m targets), N the targets of the whole step (every micro-batch of all W processes), and
    the factor r_m * W / R on its router terms (means over its r_m routed tokens: padding is not
    routed), R the routed tokens of the step; one all-reduce for both. The step's losses and
    gradients are then means over every target token and every routed token, as one process
    running the global batch at once computes them; a mean of micro-batch means would weigh a
    token of a micro-batch with few assistant tokens (or much padding) above the others. Counted
    on the CPU: no device sync. -> (LM factors, router factors, N as a 0-dim device tensor)."""
    b = backend
    targets = [float((batch[1] != -100).sum()) for batch in batches]
    routed = [float(_routed_tokens(batch)) for batch in batches]
    totals = b.all_reduce(torch.tensor([sum(targets), sum(routed)], device=b.device), "sum")
    lm = [c * b.world_size / totals[0].clamp_min(1) for c in targets]
    return lm, [r * b.world_size / totals[1].clamp_min(1) for r in routed], totals[0]


def _routed_tokens(batch: Batch) -> int:
    real = getattr(batch, "real_BT", None)
    return int(batch[0].numel()) if real is None else int(real.sum())


def train_step(
    backend: Backend, cfg: Config, batches: Sequence[Batch], eos_id: int, step: int,
    start: float | None = None, packed: bool = False,
) -> StepResult:  # fmt: skip
    """Forward and backward over `batches` (the step's micro-batches, all of them), then the
    backend's step. `step` is the number of the step being run (1 for the first); `packed`: the
    batches are packed conversations (token-weighted LM loss, see lm_weights)."""
    start = time.perf_counter() if start is None else start
    b = backend
    b.model.train()
    accum = len(batches)
    losses: dict[str, torch.Tensor] = {}
    counts_LE: torch.Tensor | None = None
    dropped_L: torch.Tensor | None = None
    entropy_L: torch.Tensor | None = None

    def count(batch: Batch) -> torch.Tensor:
        return count_routes(b, cfg, eos_id, batch)

    weights, router_weights, targets = lm_weights(b, batches) if packed else (None, None, None)

    def part(value: torch.Tensor, micro: int) -> torch.Tensor:
        """A micro-batch's router term (or its logged value) as its part of the step's mean: its
        share of the routed tokens when packed, else 1/accum. Divided, not multiplied by 1/accum:
        x * (1/3) differs from x / 3 in the last bit, and unpacked runs log what they always did."""
        return value / accum if router_weights is None else value * router_weights[micro]

    with global_batch_step(b.raw_model, batches, count):
        for micro, batch in enumerate(batches):
            with b.accumulate(sync=micro == accum - 1), b.autocast():
                out = forward(cfg, b.device, eos_id, b.model, batch, return_logits=False)
                weighted: dict[str, torch.Tensor] = {}
                if weights is not None:  # token-weighted terms
                    lm = out.lm_loss * weights[micro]
                    weighted = {"loss": part(out.loss - out.lm_loss, micro) + lm, "lm_loss": lm}
                    b.backward(faults.poison(weighted["loss"], step))
                else:
                    b.backward(faults.poison(out.loss, step) / accum)
            for key in ("loss", "lm_loss", "aux_loss", "hf_aux_loss", "z_loss"):
                value = getattr(out, key)
                if value is not None:
                    value = weighted[key] if key in weighted else part(value.detach().float(), micro)
                    losses[key] = losses.get(key, 0) + value.detach().float()
            if out.expert_counts_LE is not None and out.dropped_L is not None:
                counts_LE = out.expert_counts_LE if counts_LE is None else counts_LE + out.expert_counts_LE
                dropped_L = out.dropped_L if dropped_L is None else dropped_L + out.dropped_L
            if out.router_entropy_L is not None:
                entropy = part(out.router_entropy_L, micro)
                entropy_L = entropy if entropy_L is None else entropy_L + entropy
    faults.hit("step", step)
    grad_norm, stepped = b.step(cfg.optim.grad_clip)
    if counts_LE is not None and cfg.model.aux_free_bias:
        # Every rank applies the same update from the global load, so biases stay identical.
        b.raw_model.update_expert_bias(b.all_reduce(counts_LE.float(), "sum"))
    seconds = time.perf_counter() - start
    return StepResult(losses, counts_LE, dropped_L, grad_norm, stepped, seconds, entropy_L, targets)
