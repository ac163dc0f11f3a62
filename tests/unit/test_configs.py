"""Every shipped experiment config loads, and its parameter counts match a formula written by hand.

The formula is independent of the model code: if a layer gains or loses a weight, or count_params
mis-assigns active experts, the two disagree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_lm.config import ModelConfig, load_config
from moe_lm.model.params import count_params

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# accelerate/ holds launcher configs (and DeepSpeed JSON sits beside them), not run configs.
SHIPPED = sorted(
    p for p in CONFIG_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and "accelerate" not in p.parts
)


def analytic_params(m: ModelConfig) -> tuple[int, int]:
    """(total, active) from the architecture alone."""
    h, d = m.hidden_size, m.head_dim or m.hidden_size // m.num_heads
    attn = h * m.num_heads * d * 2 + h * m.num_kv_heads * d * 2  # q, o + k, v (no biases)
    norms = 2 * h  # before attention and before the FFN
    expert = 3 * h * (m.moe_intermediate_size or m.intermediate_size)  # gate, up, down
    router = m.num_experts * h
    shared = m.num_shared_experts * expert
    total = active = 0
    for i in range(m.num_layers):
        is_moe = i >= m.first_dense_layers and (i + 1) % m.moe_layer_freq == 0
        if is_moe:
            total += attn + norms + router + shared + m.num_experts * expert
            active += attn + norms + router + shared + m.top_k * expert
        else:
            total += attn + norms + 3 * h * m.intermediate_size
            active += attn + norms + 3 * h * m.intermediate_size
    outer = m.vocab_size * h * (1 if m.tie_embeddings else 2) + h  # embedding (+ head) + final norm
    return total + outer, active + outer


def test_configs_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"tiny-shakespeare", "mixtral-8x7b"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_loads_and_counts_match_formula(path: Path) -> None:
    cfg = load_config(path)
    counts = count_params(cfg.model)
    total, active = analytic_params(cfg.model)
    assert counts.total_params == total
    assert counts.active_params == active
    components = counts.components
    assert isinstance(components, dict) and sum(components.values()) == total


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_data_fits_its_vocabulary(path: Path) -> None:
    """A BPE tokenizer learns at most a few thousand tokens from the 1 MB tinyshakespeare file, so a
    config with a real vocabulary must name real data, and a Shakespeare prompt only suits Shakespeare."""
    cfg = load_config(path)
    files = [*cfg.data.train_files, *(f for s in cfg.data.sources.values() for f in s.files)]
    on_shakespeare = not cfg.data.sources and any("tinyshakespeare" in f for f in files)
    if cfg.model.vocab_size > 8192:
        assert not on_shakespeare, (
            f"{path.name}: {cfg.model.vocab_size} tokens cannot come from tinyshakespeare"
        )
        assert cfg.train.sample_prompt != "ROMEO:"
    if on_shakespeare:
        assert (CONFIG_DIR.parent / "data" / "tinyshakespeare.txt").is_file()


def test_mixtral_8x7b_is_46_7b_total_12_9b_active() -> None:
    # Written out from the published shape, not read from the YAML or from count_params.
    vocab, h, inter, layers, heads, kv_heads, experts, top_k = 32000, 4096, 14336, 32, 32, 8, 8, 2
    d = h // heads
    attn = 2 * h * heads * d + 2 * h * kv_heads * d  # 41,943,040
    expert = 3 * h * inter  # 176,160,768
    per_layer_total = attn + experts * expert + experts * h + 2 * h
    per_layer_active = attn + top_k * expert + experts * h + 2 * h
    outer = 2 * vocab * h + h
    total, active = layers * per_layer_total + outer, layers * per_layer_active + outer
    assert total == 46_702_792_704 and active == 12_879_925_248
    assert total == pytest.approx(46.7e9, rel=0.01) and active == pytest.approx(12.9e9, rel=0.01)

    cfg = load_config(CONFIG_DIR / "mixtral-8x7b.yaml")
    m = cfg.model
    shape = (
        m.vocab_size,
        m.hidden_size,
        m.intermediate_size,
        m.num_layers,
        m.num_heads,
        m.num_kv_heads,
        m.num_experts,
        m.top_k,
    )
    assert shape == (vocab, h, inter, layers, heads, kv_heads, experts, top_k)
    assert not m.tie_embeddings and m.moe_layer_freq == 1 and m.first_dense_layers == 0
    counts = count_params(m)
    assert (counts.total_params, counts.active_params) == (total, active)
    assert counts.components == {
        "embedding": vocab * h,
        "lm_head": vocab * h,
        "attention": layers * attn,
        "experts": layers * experts * expert,
        "router": layers * experts * h,
        "norms": (2 * layers + 1) * h,
    }


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_shared_experts=2, moe_intermediate_size=1408),
        dict(moe_layer_freq=2, first_dense_layers=1),
        dict(tie_embeddings=True, head_dim=96, num_kv_heads=2),  # q/o are 512 -> 768, not square
        dict(num_experts=64, top_k=6, moe_intermediate_size=256, first_dense_layers=3),
    ],
)
def test_formula_covers_architecture_variants(overrides: dict) -> None:
    # Shapes the shipped configs may not use yet; the meta-device count must still agree.
    base: dict = dict(
        vocab_size=1000, hidden_size=512, intermediate_size=1024, num_layers=6, num_heads=8, num_kv_heads=4
    )
    m = ModelConfig(**{**base, **overrides})
    counts = count_params(m)
    assert (counts.total_params, counts.active_params) == analytic_params(m)
