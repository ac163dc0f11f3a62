"""Our model against transformers' MixtralForCausalLM holding the same weights: logits, losses, round trip."""

from __future__ import annotations

import pytest
import torch

from moe_lm.config import ModelConfig
from moe_lm.errors import UserError
from moe_lm.hf.convert import (
    check_exportable,
    from_hf_config,
    from_hf_state_dict,
    to_hf_config,
    to_hf_model,
    to_hf_state_dict,
    upcycle_state_dict,
)
from moe_lm.model import MoETransformer
from tests.conftest import tiny_model_config

# init_std 0.1 instead of 0.02: logits of order 1 and peaked routing make a real test of parity
# (with tiny weights every logit is near 0 and any two models agree to 1e-4).
PARITY_STD = 0.1


def _pair(cfg: ModelConfig) -> tuple[MoETransformer, torch.nn.Module]:
    ours = MoETransformer(cfg).eval()
    return ours, to_hf_model(cfg, ours.state_dict())


def test_config_round_trip() -> None:
    for cfg in (
        tiny_model_config(),
        tiny_model_config(
            top_k=3, aux_loss_coef=0.017, router_jitter=0.01, tie_embeddings=True, head_dim=32, rope_theta=5e5
        ),
    ):
        hf = to_hf_config(cfg)
        assert hf.intermediate_size == cfg.expert_intermediate_size
        assert hf.rope_parameters == {"rope_type": "default", "rope_theta": cfg.rope_theta}
        assert hf.router_aux_loss_coef == pytest.approx(cfg.aux_loss_coef / cfg.top_k)
        assert hf.sliding_window is None and hf.output_router_logits is False
        assert from_hf_config(hf) == cfg


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tie: bool) -> None:
    cfg = tiny_model_config(tie_embeddings=tie, init_std=PARITY_STD)
    ours, hf = _pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding
    mask[2, 5:] = 0
    with torch.no_grad():
        a = ours(ids).logits
        b = hf(ids, use_cache=False).logits
        a_pad = ours(ids, attention_mask=mask).logits
        b_pad = hf(ids, attention_mask=mask, use_cache=False).logits
    diff = (a - b).abs().max().item()
    real = mask.bool()
    diff_pad = (a_pad - b_pad)[real].abs().max().item()
    print(
        f"\n[parity tie={tie}] fp32 logits max|ours-hf| no mask {diff:.3e}, right-padded (real tokens) "
        f"{diff_pad:.3e}; logits max|x| {a.abs().max().item():.2f}"
    )
    assert a.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert diff < 1e-4 and diff_pad < 1e-4
    # Right padding leaves the real tokens' logits as they are without padding.
    assert torch.allclose(a_pad[0], a[0], atol=1e-5) and torch.allclose(a_pad[1, :17], a[1, :17], atol=1e-5)


def test_losses_match_transformers() -> None:
    cfg = tiny_model_config(init_std=PARITY_STD, aux_loss_coef=0.02)
    ours, hf = _pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    labels = torch.cat(
        (ids[:, 1:], torch.full((2, 1), -100)), dim=1
    )  # we do not shift inside, transformers does
    with torch.no_grad():
        out = ours(ids, labels=labels)
        ref = hf(ids, labels=ids, use_cache=False, output_router_logits=True)
    assert out.hf_aux_loss is not None and out.lm_loss is not None
    print(
        f"\n[parity] aux loss ours(hf form) {out.hf_aux_loss.item():.6f} transformers {ref.aux_loss.item():.6f}; "
        f"ours(Switch form) {out.aux_loss.item():.6f}; lm loss ours {out.lm_loss.item():.6f} "
        f"transformers {ref.loss.item() - hf.config.router_aux_loss_coef * ref.aux_loss.item():.6f}"
    )
    torch.testing.assert_close(out.hf_aux_loss, ref.aux_loss, rtol=1e-6, atol=1e-6)
    # transformers' loss = lm + router_aux_loss_coef * aux with router_aux_loss_coef = our coef / k.
    expected = out.lm_loss + cfg.aux_loss_coef / cfg.top_k * out.hf_aux_loss
    torch.testing.assert_close(ref.loss, expected, rtol=1e-5, atol=1e-5)
    # One MoE layer: transformers' pooled form is exactly k times our Switch form.
    one = tiny_model_config(num_layers=1, init_std=PARITY_STD)
    single = MoETransformer(one).eval()(ids)
    assert single.hf_aux_loss is not None and single.aux_loss is not None
    torch.testing.assert_close(single.hf_aux_loss, one.top_k * single.aux_loss)


def test_masked_aux_loss_matches_transformers() -> None:
    # With an attention mask transformers leaves padding out of its load-balancing loss; so do we.
    cfg = tiny_model_config(init_std=PARITY_STD)
    ours, hf = _pair(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    mask[2, :9] = 0  # left padding
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        ref = hf(ids, attention_mask=mask, use_cache=False, output_router_logits=True)
    assert out.hf_aux_loss is not None
    print(
        f"\n[parity] masked aux loss ours {out.hf_aux_loss.item():.6f} transformers {ref.aux_loss.item():.6f}"
    )
    torch.testing.assert_close(out.hf_aux_loss, ref.aux_loss, rtol=1e-6, atol=1e-6)
    assert out.num_tokens == int(mask.sum())


@pytest.mark.parametrize("tie", [False, True])
def test_state_dict_round_trip_is_bit_exact(tie: bool) -> None:
    cfg = tiny_model_config(tie_embeddings=tie)
    ours, hf = _pair(cfg)
    hf_state = hf.state_dict()
    assert set(hf_state) == set(type(hf)(hf.config).state_dict())  # exactly transformers' keys
    back = from_hf_state_dict(hf_state, cfg)
    mine = ours.state_dict()
    assert set(back) == set(mine)
    assert all(torch.equal(back[k], mine[k]) and back[k].dtype == mine[k].dtype for k in mine)
    # The pure rename hands back the very same tensors both ways.
    assert all(v is mine[k] for k, v in from_hf_state_dict(to_hf_state_dict(mine, cfg), cfg).items())


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"num_shared_experts": 1}, "model.num_shared_experts"),
        ({"aux_free_bias": True}, "model.aux_free_bias"),
        ({"moe_layer_freq": 2}, "model.moe_layer_freq"),
        ({"first_dense_layers": 1}, "model.first_dense_layers"),
        ({"capacity_factor": 1.25}, "model.capacity_factor"),
    ],
)
def test_refuses_what_mixtral_cannot_express(overrides: dict[str, object], named: str) -> None:
    cfg = tiny_model_config(**overrides)
    with pytest.raises(UserError, match=named) as info:
        check_exportable(cfg)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=named):
        to_hf_config(cfg)


def test_from_hf_config_refuses_what_we_cannot_compute() -> None:
    from transformers import LlamaConfig

    base = to_hf_config(tiny_model_config()).to_dict()
    with pytest.raises(UserError, match="sliding"):
        from_hf_config(type(to_hf_config(tiny_model_config()))(**{**base, "sliding_window": 16}))
    with pytest.raises(UserError, match="rope scaling"):
        from_hf_config(
            type(to_hf_config(tiny_model_config()))(
                **{**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
            )
        )
    with pytest.raises(UserError, match="Mixtral"):
        from_hf_config(LlamaConfig())  # type: ignore[arg-type]


def test_upcycled_model_equals_dense_model_in_memory() -> None:
    """Identical experts with renormalised top-k weights compute exactly the dense MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = tiny_model_config(init_std=PARITY_STD, first_dense_layers=1, num_layers=3)
    dense_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=PARITY_STD,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
    dense = LlamaForCausalLM(dense_cfg).eval()
    ours = MoETransformer(cfg).eval()
    ours.load_state_dict(upcycle_state_dict(dense.state_dict(), cfg, torch.Generator().manual_seed(0)))
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        diff = (ours(ids).logits - dense(ids, use_cache=False).logits).abs().max().item()
    print(f"\n[upcycle] max|moe - dense| logits {diff:.3e}")
    assert diff < 1e-4


def test_shipped_mixtral_8x7b_config_maps_to_the_real_mixtral_shape() -> None:
    """Sized on the meta device: transformers' model of our config has our 46.7B parameters."""
    from pathlib import Path

    from transformers import MixtralConfig, MixtralForCausalLM

    from moe_lm.config import load_config
    from moe_lm.model.params import count_params

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "mixtral-8x7b.yaml").model
    hf_cfg = to_hf_config(cfg)
    with torch.device("meta"):
        hf = MixtralForCausalLM(hf_cfg)
    total = sum(p.numel() for p in hf.parameters())
    assert total == count_params(cfg).total_params
    assert round(total / 1e9, 1) == 46.7
    real = MixtralConfig()  # transformers' defaults are Mixtral-8x7B-v0.1
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_local_experts",
        "num_experts_per_tok",
        "rms_norm_eps",
    ):
        assert getattr(hf_cfg, key) == getattr(real, key), key
    assert hf_cfg.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"]
