"""Reading the pickle files of checkpoints written before the state moved to safetensors + JSON
(`optim-ep{r}-of-{n}.pt`, `rank{r}.pt`), without ever running code from them.

They are read with `torch.load(weights_only=True)`: PyTorch's restricted unpickler, which builds
only tensors, plain containers and numbers, plus the globals allowed here by name. Old rank files
hold numpy's RNG state (an array and its dtype), so numpy's array reconstruction is allowed; it
makes arrays of plain data and calls nothing else. Anything more (a class, a function, `os.system`
behind a `__reduce__`) is refused with one line before any of it is built. Nothing is converted
on disk: the checkpoint stays as it was, and the next one is written in today's format.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_lm.errors import UserError


def _numpy_globals() -> list[Any]:
    """numpy's array pickling, as old rank files used it (np.random.get_state())."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core to np._core
    allowed: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("u1", "u4", "i4", "i8", "f4", "f8")]  # the dtype classes
    return allowed


def _disallowed(path: Path) -> list[str] | None:
    """The globals the file asks for that are not allowed, or None when the file cannot be listed
    (not a zip archive: damaged, or a plain pickle)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return None
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_globals()}
    return sorted(n for n in names if n not in allowed)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_pickle_safely(path: Path) -> Any:
    """What an old checkpoint file holds (tensors, dicts, lists, numbers, strings, numpy arrays);
    a file asking for anything else is refused with one line and nothing of it runs. Every other
    failure (a damaged archive, junk, a directory) is one line too, whatever torch raised."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols would be lines of their own
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = _disallowed(path)
        if unsafe:
            raise UserError(
                f"checkpoint file {path} holds pickled {', '.join(unsafe[:3])}, which a checkpoint never needs; "
                "loading it could run code, so it was not loaded: use a checkpoint from a source you trust "
                "(one that holds only tensors and plain data)"
            ) from None
        raise UserError(
            f"checkpoint file {path} is not one torch's restricted loader can read (damaged, or a pickle of "
            "objects that are not tensors and plain data); it was not loaded and nothing in it ran: use an "
            "earlier checkpoint, or one from a source you trust"
        ) from None
    except (
        Exception
    ) as e:  # truncated or junk archives raise RuntimeError, KeyError, struct.error, OSError...
        raise UserError(
            f"cannot read checkpoint file {path} ({_first_line(e)}); the checkpoint is "
            "damaged: use an earlier one"
        ) from None


__all__ = ["load_pickle_safely"]
