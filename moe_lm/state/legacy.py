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
import zipfile
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


def _disallowed(path: Path) -> str:
    """The globals the file asks for that are not allowed, for the error line."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        return "objects that are not tensors or plain data"
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_globals()}
    shown = sorted(n for n in names if n not in allowed)
    return ", ".join(shown[:3]) or "objects that are not tensors or plain data"


def load_pickle_safely(path: Path) -> Any:
    """What an old checkpoint file holds (tensors, dicts, lists, numbers, strings, numpy arrays);
    a file asking for anything else is refused with one line and nothing of it runs."""
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"checkpoint file {path} holds pickled {_disallowed(path)}, which a checkpoint never needs; "
            "loading it could run code, so it was not loaded: use a checkpoint from a source you trust "
            "(one that holds only tensors and plain data)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint file {path} ({first}); the checkpoint is damaged") from None


__all__ = ["load_pickle_safely"]
