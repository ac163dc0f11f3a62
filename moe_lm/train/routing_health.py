"""Routing health in the training metrics, on by default (`default_callbacks` wires both):

- train records: `router_entropy`, per MoE layer the mean entropy of the router's distribution over
  the step's tokens in nats (ln E = undecided, 0 = certain), mean over processes. The model computes
  it in every training forward (moe_lm/model/losses.router_entropy); here it is only reduced.
- eval records: `repetition_first` and `repetition_either`, per MoE layer the share of consecutive
  validation tokens whose first-choice expert is the same, or that share any of their k experts
  (uniform random routing: 1/E and 1 - C(E-k, k)/C(E, k)), over every validation set and process.
  Recorded from the routers during the evaluation passes (forward hooks), not by another pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from moe_lm.model.routing_record import RoutingTally, record_routing

if TYPE_CHECKING:
    from moe_lm.train.trainer import StepResult, Trainer


def router_entropy(trainer: Trainer, result: StepResult) -> dict[str, Any]:
    """A `LogMetrics` extra: the step's per-layer router entropy, mean over processes."""
    if result.router_entropy_L is None:
        return {}
    entropy_L = trainer.backend.all_reduce(result.router_entropy_L.float(), "mean")
    return {"router_entropy": [round(float(v), 5) for v in entropy_L]}


@contextmanager
def eval_repetition(trainer: Trainer) -> Iterator[Callable[[], dict[str, Any]]]:
    """An `Evaluate` probe: records routing while the evaluation passes run, then gives the
    repetition rates of all processes together (a collective: every process reads it)."""
    model = trainer.backend.raw_model
    if not model.moe_layers:
        yield dict
        return
    with record_routing(model) as record:
        yield lambda: _rates(trainer, record.tallies)


def _rates(trainer: Trainer, tallies: list[RoutingTally]) -> dict[str, Any]:
    b = trainer.backend
    local = torch.stack([t.as_tensor() for t in tallies]).to(b.device)
    total = b.all_reduce(local, "sum").cpu()
    merged = [RoutingTally.from_tensor(row, tallies[0].num_experts) for row in total]
    return {
        "repetition_first": [round(t.first_repeat_rate(), 5) for t in merged],
        "repetition_either": [round(t.either_repeat_rate(), 5) for t in merged],
    }
