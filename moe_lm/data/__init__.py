"""Data: the BPE tokenizer, packed token blocks cached on disk, and a resumable sharded loader."""

from __future__ import annotations

from moe_lm.data.dataset import load_blocks
from moe_lm.data.loader import ResumableLoader, eval_batches
from moe_lm.data.tokenizer import Tokenizer, check_vocab, ensure_tokenizer, tokenizer_main, train_tokenizer

__all__ = [
    "ResumableLoader",
    "Tokenizer",
    "check_vocab",
    "ensure_tokenizer",
    "eval_batches",
    "load_blocks",
    "tokenizer_main",
    "train_tokenizer",
]
