"""Fixtures for end-to-end runs: a small corpus, a tokenizer trained once, and run configs around them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moe_lm.config import Config, config_from_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~120 KB of the shipped corpus: enough for a few hundred blocks of 32 tokens."""
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:120_000]
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moe_lm.data.tokenizer import train_tokenizer

    return train_tokenizer([str(corpus)], 384, tmp_path_factory.mktemp("tok") / "tokenizer")


def run_config_dict(
    corpus: Path, tokenizer_dir: Path, out: Path, **sections: dict[str, Any]
) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "test-run",
        "model": dict(
            vocab_size=384,
            hidden_size=48,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_seq_len=64,
            rope_theta=10000.0,
            num_experts=4,
            top_k=2,
        ),
        "data": dict(
            train_files=[str(corpus)],
            tokenizer=str(tokenizer_dir),
            seq_len=32,
            cache_dir=str(out.parent / "cache"),
            val_fraction=0.05,
        ),
        "optim": dict(lr=3e-3, warmup_steps=2),
        "train": dict(
            output_dir=str(out),
            micro_batch_size=4,
            max_steps=6,
            eval_every=0,
            eval_batches=2,
            sample_tokens=8,
        ),
        "logging": dict(log_every=1, progress_bar=False),
        "checkpoint": dict(every=0, keep_last=2),
    }
    for key, values in sections.items():
        base[key] = {**base.get(key, {}), **values}
    return base


@pytest.fixture
def make_config(corpus: Path, tokenizer_dir: Path, tmp_path: Path):
    def make(out: str = "run", **sections: dict[str, Any]) -> Config:
        return config_from_dict(run_config_dict(corpus, tokenizer_dir, tmp_path / out, **sections))

    return make
