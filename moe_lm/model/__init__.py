"""Plain single-device PyTorch model code. Never imports torch.distributed (see moe_lm/parallel)."""

from moe_lm.model.transformer import CausalLMOutput, MoETransformer

__all__ = ["CausalLMOutput", "MoETransformer"]
