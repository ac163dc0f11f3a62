"""Conversion between moe_lm and transformers: Mixtral config and weights, and dense Llama -> MoE.

Weights are mapped in transformers' *in-memory* layout (what `MixtralForCausalLM.state_dict()`
holds in transformers 5.x: fused `mlp.experts.gate_up_proj [E, 2I, H]`); `save_pretrained` writes
the legacy per-expert names (`block_sparse_moe.experts.N.w1/w2/w3`) itself and `from_pretrained`
converts them back, so we never touch the on-disk names. Our expert tensors already use the same
layout, so Mixtral conversion is a pure rename: a round trip gives the very same tensors.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import torch

from moe_lm.config import ModelConfig
from moe_lm.errors import UserError

if TYPE_CHECKING:
    from transformers import LlamaConfig, MixtralConfig

# (our name, transformers name); "{L}" is a layer index. Order does not matter: names are disjoint.
_MIXTRAL_NAMES = (
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{L}.attn_norm.weight", "model.layers.{L}.input_layernorm.weight"),
    ("layers.{L}.ffn_norm.weight", "model.layers.{L}.post_attention_layernorm.weight"),
    ("layers.{L}.attn.q_proj.weight", "model.layers.{L}.self_attn.q_proj.weight"),
    ("layers.{L}.attn.k_proj.weight", "model.layers.{L}.self_attn.k_proj.weight"),
    ("layers.{L}.attn.v_proj.weight", "model.layers.{L}.self_attn.v_proj.weight"),
    ("layers.{L}.attn.o_proj.weight", "model.layers.{L}.self_attn.o_proj.weight"),
    ("layers.{L}.ffn.router.weight", "model.layers.{L}.mlp.gate.weight"),
    ("layers.{L}.ffn.experts.gate_up_proj", "model.layers.{L}.mlp.experts.gate_up_proj"),
    ("layers.{L}.ffn.experts.down_proj", "model.layers.{L}.mlp.experts.down_proj"),
)

# Upcycling reuses every non-FFN name of the Mixtral table (Llama and Mixtral share them).
_SHARED_NAMES = tuple(pair for pair in _MIXTRAL_NAMES if ".ffn." not in pair[0])

# Upcycled routers start near uniform (std = this x model.init_std): every expert is the same
# dense MLP, so routing cannot change the output yet, and small logits let gradients reach all
# experts early instead of locking in whichever expert random logits happened to favour.
UPCYCLE_ROUTER_STD_SCALE = 0.1


def _compile(pairs: tuple[tuple[str, str], ...], reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        pattern = re.escape(src).replace(r"\{L\}", r"(?P<L>\d+)")
        rules.append((re.compile(f"^{pattern}$"), dst))
    return rules


def _rename(
    state: dict[str, torch.Tensor], rules: list[tuple[re.Pattern[str], str]], what: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for pattern, dst in rules:
            m = pattern.match(key)
            if m:
                out[dst.replace("{L}", m.groupdict().get("L") or "")] = value
                break
        else:
            raise UserError(
                f"weight '{key}' has no {what} equivalent; the model uses an option that cannot be converted"
            )
    return out


# ---------------------------------------------------------------------------------------------
# Mixtral


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, in one line naming the option, what MixtralForCausalLM cannot compute identically."""
    refusals = (
        (cfg.num_shared_experts > 0, "model.num_shared_experts > 0 (Mixtral has no shared experts)"),
        (cfg.aux_free_bias, "model.aux_free_bias: true (Mixtral's router has no selection bias)"),
        (
            cfg.moe_layer_freq != 1,
            f"model.moe_layer_freq = {cfg.moe_layer_freq} (every Mixtral layer is MoE)",
        ),
        (
            cfg.first_dense_layers > 0,
            f"model.first_dense_layers = {cfg.first_dense_layers} (Mixtral has no dense layers)",
        ),
        (
            cfg.capacity_factor is not None,
            "model.capacity_factor (Mixtral is dropless; outputs would differ)",
        ),
    )
    for refused, why in refusals:
        if refused:
            raise UserError(
                f"cannot export to Mixtral: {why}; train without it or keep the moe_lm checkpoint"
            )


def to_hf_config(
    cfg: ModelConfig, bos_token_id: int | None = 1, eos_token_id: int | None = 2
) -> MixtralConfig:
    """The MixtralConfig computing what `MoETransformer(cfg)` computes (after `check_exportable`)."""
    from transformers import MixtralConfig

    check_exportable(cfg)
    return MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.expert_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings,
        sliding_window=None,
        attention_dropout=0.0,
        num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        # Our aux loss is the Switch form (1.0 when balanced); transformers' pools layers and is k
        # when balanced, so dividing by k keeps the same pull towards balance.
        router_aux_loss_coef=cfg.aux_loss_coef / cfg.top_k,
        router_jitter_noise=cfg.router_jitter,
        output_router_logits=False,
        use_cache=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=None,
    )


def _rope_theta(hf: Any, what: str) -> float:
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{what} uses rope scaling {rope}; moe_lm implements plain RoPE only")
    return float(rope.get("rope_theta", getattr(hf, "rope_theta", None) or hf.default_theta))


def _check_common(hf: Any, what: str) -> None:
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise UserError(f"{what} uses hidden_act '{hf.hidden_act}'; moe_lm experts are SwiGLU (silu)")
    window = getattr(hf, "sliding_window", None)
    if window is not None and window < hf.max_position_embeddings:
        raise UserError(
            f"{what} uses sliding-window attention (sliding_window = {window} < max_position_embeddings = "
            f"{hf.max_position_embeddings}); moe_lm attends to the whole context"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            raise UserError(f"{what} has {flag} = true; moe_lm projections have no bias")


def _head_dim(hf: Any) -> int | None:
    head_dim = getattr(hf, "head_dim", None)
    default = hf.hidden_size // hf.num_attention_heads
    return None if head_dim in (None, default) else int(head_dim)


def from_hf_config(hf: MixtralConfig) -> ModelConfig:
    """Our model config from a MixtralConfig; refuses what our model cannot reproduce."""
    what = "the Mixtral config"
    if getattr(hf, "model_type", None) != "mixtral":
        raise UserError(
            f"expected a Mixtral model (model_type 'mixtral'), got '{getattr(hf, 'model_type', None)}'"
        )
    _check_common(hf, what)
    top_k = int(hf.num_experts_per_tok)
    # 10 significant digits undo the float noise of dividing and multiplying by k.
    aux_coef = float(f"{hf.router_aux_loss_coef * top_k:.10g}")
    return ModelConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=_head_dim(hf),
        max_seq_len=hf.max_position_embeddings,
        rope_theta=_rope_theta(hf, what),
        rms_norm_eps=float(hf.rms_norm_eps),
        tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=float(hf.initializer_range),
        num_experts=hf.num_local_experts,
        top_k=top_k,
        router_jitter=float(hf.router_jitter_noise),
        aux_loss_coef=aux_coef,
    )


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our stacked state dict -> MixtralForCausalLM's in-memory state dict (same tensor objects)."""
    check_exportable(cfg)
    out = _rename(state, _compile(_MIXTRAL_NAMES, reverse=False), "Mixtral")
    if cfg.tie_embeddings:  # transformers lists the tied head in its state dict too
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """MixtralForCausalLM's in-memory state dict -> ours (same tensor objects)."""
    state = dict(hf_state)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return _rename(state, _compile(_MIXTRAL_NAMES, reverse=True), "moe_lm")


# ---------------------------------------------------------------------------------------------
# Dense Llama -> MoE (sparse upcycling, Komatsuzaki et al. 2022)


def check_upcycle_config(cfg: ModelConfig, dense: LlamaConfig) -> None:
    """Every shape and numeric option of `cfg` must equal the dense model's (one line naming the key)."""
    what = "the dense model"
    _check_common(dense, what)
    if cfg.num_shared_experts:
        raise UserError(
            "upcycling does not support model.num_shared_experts > 0 (their sum would double the FFN)"
        )
    kv_heads = dense.num_key_value_heads or dense.num_attention_heads
    head_dim = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    expected: list[tuple[str, Any, Any]] = [
        ("vocab_size", cfg.vocab_size, dense.vocab_size),
        ("hidden_size", cfg.hidden_size, dense.hidden_size),
        ("num_layers", cfg.num_layers, dense.num_hidden_layers),
        ("num_heads", cfg.num_heads, dense.num_attention_heads),
        ("num_kv_heads", cfg.num_kv_heads, kv_heads),
        ("head_dim", cfg.resolved_head_dim, head_dim),
        ("intermediate_size", cfg.intermediate_size, dense.intermediate_size),
        ("moe_intermediate_size", cfg.expert_intermediate_size, dense.intermediate_size),
        ("tie_embeddings", cfg.tie_embeddings, bool(dense.tie_word_embeddings)),
        ("rms_norm_eps", cfg.rms_norm_eps, float(dense.rms_norm_eps)),
        ("rope_theta", cfg.rope_theta, _rope_theta(dense, what)),
    ]
    for key, ours, theirs in expected:
        same = math.isclose(ours, theirs, rel_tol=1e-9) if isinstance(ours, float) else ours == theirs
        if not same:
            raise UserError(
                f"model.{key} = {ours} in the config but the dense model has {theirs}; set model.{key}={theirs}"
            )


def upcycle_state_dict(
    dense_state: dict[str, torch.Tensor], cfg: ModelConfig, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict -> our MoE state dict: every expert a copy of the dense MLP.

    With identical experts and top-k weights renormalised to sum to 1, each MoE layer computes the
    dense MLP exactly, so the upcycled model starts with the dense model's logits.
    """
    shared_rules = _compile(_SHARED_NAMES, reverse=True)
    mlp = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
    out: dict[str, torch.Tensor] = {}
    mlps: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in dense_state.items():
        m = mlp.match(key)
        if m:
            mlps.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif not (cfg.tie_embeddings and key == "lm_head.weight"):
            out.update(_rename({key: value}, shared_rules, "moe_lm"))
    router_std = UPCYCLE_ROUTER_STD_SCALE * cfg.init_std
    for layer in range(cfg.num_layers):
        parts = mlps.get(layer, {})
        if set(parts) != {"gate_proj", "up_proj", "down_proj"}:
            raise UserError(
                f"the dense model lacks the MLP weights of layer {layer}; is it a Llama-style model?"
            )
        gate_up = torch.cat((parts["gate_proj"], parts["up_proj"]), dim=0)  # [2I, H]: gate rows first
        down = parts["down_proj"]
        prefix = f"layers.{layer}.ffn"
        if not cfg.is_moe_layer(layer):
            out[f"{prefix}.gate_up_proj.weight"] = gate_up
            out[f"{prefix}.down_proj.weight"] = down.clone()
            continue
        e = cfg.num_experts
        out[f"{prefix}.experts.gate_up_proj"] = gate_up.unsqueeze(0).expand(e, -1, -1).clone()
        out[f"{prefix}.experts.down_proj"] = down.unsqueeze(0).expand(e, -1, -1).clone()
        router = torch.empty(e, cfg.hidden_size, dtype=torch.float32)
        out[f"{prefix}.router.weight"] = router.normal_(0.0, router_std, generator=generator).to(
            gate_up.dtype
        )
        if cfg.aux_free_bias:
            out[f"{prefix}.router.expert_bias"] = torch.zeros(e, dtype=torch.float32)
    return out


def to_hf_model(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
) -> Any:
    """A MixtralForCausalLM (eval mode) holding our weights, cast to `dtype` when given.

    Built on the meta device and filled with `assign=True`, so no memory is spent on a random
    initialisation that would be overwritten (an 8x7B model would need 187 GB of it in fp32).
    """
    from transformers import MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    hf_cfg = to_hf_config(cfg, bos_token_id, eos_token_id)
    hf_state = to_hf_state_dict(state, cfg)
    if dtype is not None:
        cast = {id(v): v.to(dtype) for v in hf_state.values()}  # tied tensors stay one tensor
        hf_state = {k: cast[id(v)] for k, v in hf_state.items()}
    with torch.device("meta"):
        model = MixtralForCausalLM(hf_cfg)
    model.load_state_dict(hf_state, strict=True, assign=True)
    # Non-persistent buffers are not in any state dict: rebuild the RoPE tables on the CPU.
    model.model.rotary_emb = MixtralRotaryEmbedding(hf_cfg)
    if cfg.tie_embeddings:
        model.tie_weights()
    if dtype is not None:
        model.config.dtype = dtype
    return model.eval()
