"""Decoder-only causal LM whose FFN layers are mixtures of experts, and its generate()."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe_lm.config import ModelConfig
from moe_lm.model.attention import Attention, KVCache
from moe_lm.model.balance import StepCounts
from moe_lm.model.experts import Experts
from moe_lm.model.fused_ce import chunked_linear_cross_entropy
from moe_lm.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from moe_lm.model.losses import hf_load_balance_loss
from moe_lm.model.moe import MoELayer, MoEStats
from moe_lm.model.router import Router


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(index)
        self.ffn: nn.Module = MoELayer(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self,
        x_BTH: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask_BQK: torch.Tensor | None,
        cache: KVCache | None,
        real_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None, KVCache]:
        a_BTH, new_cache = self.attn(self.attn_norm(x_BTH), rope, mask_BQK, cache)
        x_BTH = x_BTH + a_BTH
        stats = None
        if self.is_moe:
            f_BTH, stats = self.ffn(self.ffn_norm(x_BTH), real_BT)
        else:
            f_BTH = self.ffn(self.ffn_norm(x_BTH))
        return x_BTH + f_BTH, stats, new_cache


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None  # lm + aux_coef * aux + z_coef * z; None without labels
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # mean over MoE layers, Switch form (1.0 = balanced)
    hf_aux_loss: torch.Tensor | None = None  # transformers' load_balancing_loss_func value (k = balanced)
    z_loss: torch.Tensor | None = None  # mean over MoE layers
    expert_counts_LE: torch.Tensor | None = None  # assignments per (MoE layer, expert), detached
    dropped_L: torch.Tensor | None = None  # capacity-dropped assignments per MoE layer
    router_entropy_L: torch.Tensor | None = None  # mean router entropy per MoE layer (nats), detached
    num_tokens: int = 0  # tokens routed per MoE layer in this pass (padding is not routed)
    cache: list[KVCache] = field(default_factory=list)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg.resolved_head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False
        # Global-batch balancing: the step's expert counts, one object shared by the MoE layers.
        self.balance = StepCounts()
        for index, layer in enumerate(self.moe_layers):
            layer.step_counts, layer.moe_index = self.balance, index
        self.reset_parameters()

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoELayer)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std); projections into the residual stream scaled by 1/sqrt(2 * layers)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, 0.0, out_std if is_out else std)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, 0.0, std)
                nn.init.normal_(module.down_proj, 0.0, out_std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def _mask(
        self, attention_mask_BT: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
    ) -> torch.Tensor | None:
        if attention_mask_BT is None and (past_len == 0 or q_len == 1):
            return None if past_len == 0 else torch.ones(1, 1, past_len + 1, dtype=torch.bool, device=device)
        kv_len = past_len + q_len
        q_pos = torch.arange(past_len, kv_len, device=device)[:, None]
        k_pos = torch.arange(kv_len, device=device)[None, :]
        mask_BQK = (k_pos <= q_pos)[None]
        if attention_mask_BT is not None:
            mask_BQK = mask_BQK & attention_mask_BT[:, None, :kv_len].bool()
            # A padded query row that may attend to nothing would give NaN; let it see itself.
            mask_BQK = mask_BQK | (k_pos == q_pos)[None]
        return mask_BQK

    @staticmethod
    def _document_mask(document_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position of each token inside its document, block-diagonal causal mask [B, T, T])."""
        _, t = document_ids_BT.shape
        idx_T = torch.arange(t, device=document_ids_BT.device)
        starts_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
        starts_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
        first_BT = torch.cummax(torch.where(starts_BT, idx_T, 0), dim=1).values  # its document's first token
        same_BQK = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
        return idx_T - first_BT, same_BQK & (idx_T[None, :] <= idx_T[:, None])

    def _attention_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: list[KVCache] | None,
        document_ids: torch.Tensor | None,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """(rotary tables, attention mask, real-token mask or None) of a forward pass."""
        b, t = input_ids.shape
        past_len = cache[0][0].shape[2] if cache else 0
        mask: torch.Tensor | None
        if document_ids is not None:
            if cache:
                raise ValueError("document_ids cannot be combined with a KV cache")
            # the documents decide attention; an attention_mask only marks padding (a document of
            # its own in packed rows) to keep it out of routing
            doc_pos, mask = self._document_mask(document_ids)
            position_ids = doc_pos if position_ids is None else position_ids
        else:
            mask = self._mask(attention_mask, t, past_len, input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + t, device=input_ids.device).expand(b, t)
        rope = self.rope(position_ids)
        real_BT = None  # padding positions of this pass, kept out of routing (MoELayer.forward)
        if attention_mask is not None:
            real_BT = attention_mask[:, past_len : past_len + t].bool()
            real_BT = None if bool(real_BT.all()) else real_BT
        return rope, mask, real_BT

    @torch.no_grad()
    def route_counts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Expert assignments per (MoE layer, expert) [L, E] of a pass that stops after the last MoE
        layer (no LM head): the counting pass of global-batch balancing (model/balance.py)."""
        moe = [i for i, block in enumerate(self.layers) if block.is_moe]
        if not moe:
            return torch.zeros(0, self.cfg.num_experts, dtype=torch.long, device=input_ids.device)
        rope, mask, real_BT = self._attention_inputs(input_ids, attention_mask, None, None, document_ids)
        x_BTH = self.embed(input_ids)
        counts: list[torch.Tensor] = []
        for block in self.layers[: moe[-1] + 1]:
            x_BTH, stats, _ = block(x_BTH, rope, mask, None, real_BT)
            if stats is not None:
                counts.append(stats.counts_E)
        return torch.stack(counts)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        return_logits: bool = True,
        document_ids: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """labels are aligned with input_ids (no shift inside); -100 is ignored.

        return_logits=False (the trainer) lets a training step with labels compute the head and the
        loss in chunks without ever holding the [tokens, vocab] logits; `logits` is then None.
        document_ids [B, T] (packed documents, e.g. moe_lm.data.blocks.document_ids): a token attends
        only to earlier tokens of its own document, and positions restart at 0 in each document, so
        every document is computed as if it were alone. With document_ids, attention_mask (0 at
        padding) only keeps the padding out of routing.
        """
        b, t = input_ids.shape
        rope, mask, real_BT = self._attention_inputs(
            input_ids, attention_mask, position_ids, cache, document_ids
        )
        x_BTH = self.embed(input_ids)
        all_stats: list[MoEStats] = []
        new_cache: list[KVCache] = []
        for i, block in enumerate(self.layers):
            layer_cache = cache[i] if cache else None
            if self.activation_checkpointing and self.training:
                x_BTH, stats, kv = checkpoint(
                    block, x_BTH, rope, mask, layer_cache, real_BT, use_reentrant=False
                )
            else:
                x_BTH, stats, kv = block(x_BTH, rope, mask, layer_cache, real_BT)
            new_cache.append(kv)
            if stats is not None:
                all_stats.append(stats)
        x_BTH = self.norm(x_BTH)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        chunked = (
            labels is not None
            and not return_logits
            and torch.is_grad_enabled()
            and x_BTH.dtype == torch.float32
            and not torch.is_autocast_enabled(x_BTH.device.type)
        )
        out = CausalLMOutput(cache=new_cache)
        if all_stats:
            self._add_router_losses(out, all_stats)
        if labels is not None and chunked:
            out.lm_loss = chunked_linear_cross_entropy(x_BTH.reshape(b * t, -1), head, labels.reshape(-1))
        else:
            out.logits = F.linear(x_BTH, head)
        if labels is not None:
            if out.logits is not None:
                # the mean over the targets, 0 when there are none (as the chunked loss): a packed
                # micro-batch without assistant tokens weighs 0 in its step (train/step.py
                # lm_weights), and 0 * cross_entropy's NaN of an empty mean would be NaN
                targets = (labels != -100).sum().clamp_min(1)
                out.lm_loss = (
                    F.cross_entropy(
                        out.logits.float().view(b * t, -1),
                        labels.reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                    / targets
                )
            assert out.lm_loss is not None
            out.loss = out.lm_loss
            if out.aux_loss is not None and out.z_loss is not None:
                out.loss = (
                    out.lm_loss + self.cfg.aux_loss_coef * out.aux_loss + self.cfg.z_loss_coef * out.z_loss
                )
        return out

    def _add_router_losses(self, out: CausalLMOutput, stats: list[MoEStats]) -> None:
        out.aux_loss = torch.stack([s.aux_loss for s in stats]).mean()
        out.z_loss = torch.stack([s.z_loss for s in stats]).mean()
        counts_LE = torch.stack([s.counts_E for s in stats])
        probs_LE = torch.stack([s.probs_mean_E for s in stats])
        out.hf_aux_loss = hf_load_balance_loss(counts_LE, probs_LE.detach(), stats[0].num_tokens)
        out.expert_counts_LE = counts_LE.detach()
        out.dropped_L = torch.stack([s.dropped for s in stats]).detach()
        out.router_entropy_L = torch.stack([s.entropy for s in stats])
        out.num_tokens = stats[0].num_tokens

    @torch.no_grad()
    def update_expert_bias(self, counts_LE: torch.Tensor) -> None:
        """Aux-free balancing step; call after each optimizer step with the (global) expert counts."""
        for layer, counts_E in zip(self.moe_layers, counts_LE):
            layer.router.update_bias(counts_E, self.cfg.aux_free_update_rate)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample with a KV cache; temperature 0 is greedy. Returns prompt + continuation."""
        was_training = self.training
        self.eval()
        out = self(input_ids)
        tokens = input_ids
        for _ in range(max_new_tokens):
            assert out.logits is not None
            logits_BV = out.logits[:, -1, :].float()
            if temperature <= 0:
                next_B1 = logits_BV.argmax(dim=-1, keepdim=True)
            else:
                logits_BV = logits_BV / temperature
                if top_k:
                    kth = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1])).values[:, -1:]
                    logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
                next_B1 = torch.multinomial(torch.softmax(logits_BV, dim=-1), 1, generator=generator)
            tokens = torch.cat((tokens, next_B1), dim=1)
            if eos_id is not None and bool((next_B1 == eos_id).all()):
                break
            out = self(next_B1, cache=out.cache)
        self.train(was_training)
        return tokens
