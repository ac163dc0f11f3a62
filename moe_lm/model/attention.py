"""Grouped-query attention through scaled_dot_product_attention, with an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_lm.config import ModelConfig
from moe_lm.model.layers import apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys, values: [B, num_kv_heads, T_past, head_dim]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x_BTH: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask_BQK: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """mask_BQK: boolean, True where a query may attend; None means plain causal (no cache)."""
        b, t, _ = x_BTH.shape
        q_BNTD = self.q_proj(x_BTH).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k_BKTD = self.k_proj(x_BTH).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BKTD = self.v_proj(x_BTH).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q_BNTD = apply_rotary(q_BNTD, cos, sin)
        k_BKTD = apply_rotary(k_BKTD, cos, sin)
        if cache is not None:
            k_BKTD = torch.cat((cache[0], k_BKTD), dim=2)
            v_BKTD = torch.cat((cache[1], v_BKTD), dim=2)
        new_cache = (k_BKTD, v_BKTD)
        gqa = self.num_heads != self.num_kv_heads
        if mask_BQK is None:
            out_BNTD = F.scaled_dot_product_attention(q_BNTD, k_BKTD, v_BKTD, is_causal=True, enable_gqa=gqa)
        else:
            out_BNTD = F.scaled_dot_product_attention(
                q_BNTD, k_BKTD, v_BKTD, attn_mask=mask_BQK[:, None], enable_gqa=gqa
            )
        out_BTH = out_BNTD.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out_BTH), new_cache
