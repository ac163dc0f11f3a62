"""Data: the BPE tokenizer, the token store on disk, mixtures of sources and a resumable sharded loader.

Names are imported lazily, so worker processes that only tokenise (moe_lm.data.prepare) do not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ResumableLoader": "moe_lm.data.loader",
    "TrainSource": "moe_lm.data.loader",
    "eval_batches": "moe_lm.data.loader",
    "RunData": "moe_lm.data.corpus",
    "open_data": "moe_lm.data.corpus",
    "prepare_sources": "moe_lm.data.prepare",
    "data_plan": "moe_lm.data.sources",
    "Tokenizer": "moe_lm.data.tokenizer",
    "check_vocab": "moe_lm.data.tokenizer",
    "ensure_tokenizer": "moe_lm.data.tokenizer",
    "tokenizer_main": "moe_lm.data.tokenizer",
    "train_tokenizer": "moe_lm.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_lm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
