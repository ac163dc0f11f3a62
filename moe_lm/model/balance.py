"""Global-batch load balancing (`model.aux_loss_scope: global_batch`).

The aux loss E * sum_i f_i * P_i of a micro-batch normally counts f_i (the share of assignments
each expert got) over that micro-batch on that rank. With `global_batch`, f_i is counted over the
whole optimizer step: every micro-batch of every data-parallel rank. P_i, and with it the gradient,
stays with the tokens of the micro-batch being run (losses.global_load_balance_loss). Averaged over
the step, the loss and its gradient equal those of one process running the global batch at once.

f has no gradient, but every micro-batch's backward needs the step's f, which depends on
micro-batches that have not run yet. `StepCounts` holds the step's counts per MoE layer, from one of:
  - a counting pass (`global_batch_step` with several micro-batches): before any backward, every
    micro-batch of the step runs through the MoE layers without autograd, with the random state
    put back afterwards so the passes that follow draw the same router jitter and choose the same
    experts; the sum over micro-batches is then summed over ranks once (L x E numbers). Cost: one
    forward without autograd per micro-batch (no LM head);
  - the pass itself, with one micro-batch per rank per step: each layer sums its own counts over the
    ranks as it routes (E numbers per layer) and keeps them for the step, so a recomputation under
    activation checkpointing reuses them instead of communicating again.
Megatron-Core instead keeps a running sum over the micro-batches seen so far, so micro-batch m
balances against the first m micro-batches only: cheaper, not exact.

The sum over ranks is `StepCounts.reduce`, a seam: the identity here (the model never imports
torch.distributed); moe_lm.parallel installs an all-reduce over the data-parallel ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moe_lm.model.transformer import MoETransformer

CountsReducer = Callable[[torch.Tensor], torch.Tensor]  # sums a counts tensor over data-parallel ranks


def _this_process_only(counts: torch.Tensor) -> torch.Tensor:
    return counts


class StepCounts:
    """Expert counts of the current optimizer step, per MoE layer, shared by a model's MoE layers."""

    def __init__(self) -> None:
        self.reduce: CountsReducer = _this_process_only
        self._counts: dict[int, torch.Tensor] = {}
        self._open = False

    @torch.compiler.disable  # python state that changes every step: keep it out of compiled graphs
    def counts(self, layer: int, counts_E: torch.Tensor) -> torch.Tensor:
        """The step's counts for MoE layer `layer` (int64), given this pass's local `counts_E`."""
        step = self._counts.get(layer)
        if step is None:
            step = self.reduce(counts_E.detach().long())
            if self._open:  # kept for a recomputation of this pass (activation checkpointing)
                self._counts[layer] = step
        return step

    @contextmanager
    def step(self, counts_LE: torch.Tensor | None = None) -> Iterator[None]:
        """One optimizer step: with `counts_LE` (summed over micro-batches and ranks) every pass uses
        them; without, each layer's first pass sums its own counts over the ranks and keeps them."""
        if self._open:
            raise RuntimeError("StepCounts.step is already open")
        self._open = True
        self._counts = {} if counts_LE is None else dict(enumerate(counts_LE.long()))
        try:
            yield
        finally:
            self._open = False
            self._counts = {}


def _rng_devices() -> list[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def count_step(
    model: MoETransformer, batches: Sequence[Any], count: Callable[[Any], torch.Tensor]
) -> torch.Tensor:
    """The counting pass: `count(batch)` (a forward to the last MoE layer giving [L, E] counts, e.g.
    `MoETransformer.route_counts`) over every micro-batch, without autograd and with the random
    state restored afterwards; summed over micro-batches and then over the ranks."""
    total: torch.Tensor | None = None
    with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices()):
        for batch in batches:
            counts = count(batch).long()
            total = counts if total is None else total + counts
    assert total is not None, "a step has at least one micro-batch"
    return model.balance.reduce(total)


@contextmanager
def global_batch_step(
    model: MoETransformer, batches: Sequence[Any], count: Callable[[Any], torch.Tensor]
) -> Iterator[None]:
    """Run one optimizer step's forward and backward passes inside this. With
    `aux_loss_scope: global_batch` every training pass takes f from the whole step's counts (a
    counting pass first when there are several micro-batches); with `micro_batch` it does nothing."""
    if model.cfg.aux_loss_scope != "global_batch":
        yield
        return
    counts = count_step(model, batches, count) if len(batches) > 1 else None
    with model.balance.step(counts):
        yield
