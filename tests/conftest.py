"""Shared test fixtures. Everything runs offline on CPU; no test downloads anything."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from moe_lm.config import ModelConfig  # noqa: E402


def tiny_model_config(**overrides: object) -> ModelConfig:
    """A model small enough for a unit test: 2 layers, 8 experts top-2, hidden 64."""
    base: dict[str, object] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=128,
        rope_theta=10000.0,
        num_experts=8,
        top_k=2,
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
