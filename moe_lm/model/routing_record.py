"""What the routers chose, recorded from outside the model while passes run (forward hooks).

`record_routing(model)` tallies, per MoE layer, the (token, slot) assignments per expert, the first
choices per expert, and how often consecutive tokens of a sequence repeat an expert: the first
choice of token t+1 equals that of token t ("first choice"), or any of its k experts is among
token t's ("either of the k"), as in the Mixtral paper's Table 5. Padding (an attention mask) is
left out. With `keep=True` it also keeps every pass's choices [B, T, k] per layer, for showing
a passage token by token.

Counts are per process: under expert parallelism each rank routes its own tokens over all E
experts, so tallies of several ranks add up (`RoutingTally.as_tensor` / `from_tensor`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moe_lm.model.transformer import MoETransformer


def repetition_counts(idx_BTK: torch.Tensor, real_BT: torch.Tensor | None = None) -> torch.Tensor:
    """[consecutive pairs, pairs whose first choices agree, pairs sharing any expert] (int64, on
    the choices' device) of the choices [B, T, k] (best first); a pair counts only when both
    tokens are real."""
    a_BTK, b_BTK = idx_BTK[:, :-1], idx_BTK[:, 1:]
    valid = torch.ones(a_BTK.shape[:2], dtype=torch.bool, device=idx_BTK.device)
    if real_BT is not None:
        valid = real_BT[:, :-1] & real_BT[:, 1:]
    first = (a_BTK[..., 0] == b_BTK[..., 0]) & valid
    either = (a_BTK[..., :, None] == b_BTK[..., None, :]).flatten(2).any(-1) & valid
    return torch.stack([valid.sum(), first.sum(), either.sum()])


def repetitions(idx_BTK: torch.Tensor, real_BT: torch.Tensor | None = None) -> tuple[int, int, int]:
    """`repetition_counts` as three ints."""
    pairs, first, either = repetition_counts(idx_BTK, real_BT).tolist()
    return pairs, first, either


class RoutingTally:
    """One MoE layer's routing over everything recorded: [assignments per expert (E), first
    choices per expert (E), consecutive pairs, first-choice repeats, either-of-k repeats] in one
    int64 vector, kept on the device of the choices (no host sync while recording)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts = torch.zeros(2 * num_experts + 3, dtype=torch.long)

    def add(self, idx_BTK: torch.Tensor, real_BT: torch.Tensor | None) -> None:
        chosen_NK = idx_BTK.reshape(-1, idx_BTK.shape[-1]) if real_BT is None else idx_BTK[real_BT]
        e = self.num_experts
        part = torch.cat(
            [
                torch.bincount(chosen_NK.reshape(-1), minlength=e),
                torch.bincount(chosen_NK[:, 0], minlength=e),
                repetition_counts(idx_BTK, real_BT),
            ]
        )
        self.counts = self.counts.to(part.device) + part

    def as_tensor(self) -> torch.Tensor:
        """Everything as one int64 vector (to sum over ranks)."""
        return self.counts

    @classmethod
    def from_tensor(cls, values: torch.Tensor, num_experts: int) -> RoutingTally:
        tally = cls(num_experts)
        tally.counts = values.long().clone()
        return tally

    @property
    def assignments_E(self) -> torch.Tensor:
        """(token, slot) assignments per expert (on the CPU)."""
        return self.counts[: self.num_experts].cpu()

    @property
    def first_E(self) -> torch.Tensor:
        """Tokens whose first choice is each expert (on the CPU)."""
        return self.counts[self.num_experts : 2 * self.num_experts].cpu()

    @property
    def tokens(self) -> int:
        return int(self.first_E.sum())

    @property
    def pairs(self) -> int:
        return int(self.counts[-3])

    @property
    def first_repeats(self) -> int:
        return int(self.counts[-2])

    @property
    def either_repeats(self) -> int:
        return int(self.counts[-1])

    def first_repeat_rate(self) -> float:
        return self.first_repeats / self.pairs if self.pairs else float("nan")

    def either_repeat_rate(self) -> float:
        return self.either_repeats / self.pairs if self.pairs else float("nan")


@dataclass
class RoutingRecord:
    """Per MoE layer (in model order): its tally, and with keep=True every pass's choices [B, T, k]."""

    tallies: list[RoutingTally]
    kept: list[list[torch.Tensor]]


@contextmanager
def record_routing(model: MoETransformer, keep: bool = False) -> Iterator[RoutingRecord]:
    """Tally the routing of every pass of `model` run inside; nothing in the model changes."""
    layers = model.moe_layers
    record = RoutingRecord([RoutingTally(model.cfg.num_experts) for _ in layers], [[] for _ in layers])
    shapes: list[Any] = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):

        def before(module: Any, args: tuple[Any, ...], i: int = i) -> None:
            x_BTH = args[0]
            real_BT = args[1] if len(args) > 1 else None
            shapes[i] = (x_BTH.shape[:2], None if real_BT is None else real_BT.bool())

        def after(module: Any, args: tuple[Any, ...], out: Any, i: int = i) -> None:
            (b, t), real_BT = shapes[i]
            idx_TK = out.topk_idx_TK.detach()
            if real_BT is None:
                idx_BTK = idx_TK.view(b, t, -1)
            else:
                idx_BTK = idx_TK.new_full((b, t, idx_TK.shape[-1]), -1)
                idx_BTK[real_BT] = idx_TK
            record.tallies[i].add(idx_BTK, real_BT)
            if keep:
                record.kept[i].append(idx_BTK.cpu())

        hooks.append(layer.register_forward_pre_hook(before))
        hooks.append(layer.router.register_forward_hook(after))
    try:
        yield record
    finally:
        for hook in hooks:
            hook.remove()
