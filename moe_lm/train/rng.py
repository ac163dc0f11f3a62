"""The training step's random stream, kept apart from the process-global one.

The training step draws random numbers (router jitter) from torch's global generators. So can
anything else in the process: evaluation, sampling, the MFU probe, a library, a callback. Exact
resume needs the step to see the same numbers as an uninterrupted run whatever ran between steps,
so the trainer owns the training state and installs it only while a step runs (`active()`);
between steps the global generators hold whatever they held before, and what is drawn there never
reaches training. Checkpoints store this state, not the global one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _capture(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _install(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainingRNG:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        outside = _capture(device)
        torch.manual_seed(seed)
        self._state = _capture(device)
        _install(outside, device)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Draws inside come from (and advance) the training stream; the global state is put back."""
        outside = _capture(self.device)
        _install(self._state, self.device)
        try:
            yield
        finally:
            self._state = _capture(self.device)
            _install(outside, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Also reads checkpoints written before this class, whose "cuda" is a list per device."""
        cuda = state.get("cuda")
        if isinstance(cuda, list | tuple):
            index = self.device.index or 0
            cuda = cuda[index] if index < len(cuda) else None
        self._state = {"torch": state["torch"].clone()}
        if cuda is not None and self.device.type == "cuda":
            self._state["cuda"] = cuda.clone()
