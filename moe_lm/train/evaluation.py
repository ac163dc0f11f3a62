"""What a run measures besides the step: validation loss on every validation set (and how the
routers spread the validation tokens over the experts), and a sample.

Both run on every process (evaluation reduces over them) with the unwrapped model, and neither
draws from the training RNG, so when they run cannot change the training that follows.
The `Evaluate` and `Sample` callbacks decide when.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from moe_lm.data.loader import eval_batches

if TYPE_CHECKING:
    from moe_lm.train.trainer import Trainer


@torch.no_grad()
def evaluate(trainer: Trainer) -> dict[str, Any]:
    """The eval record: each validation set as val/<name>/loss and /ppl; val_loss is their mean;
    val_expert_load / val_imbalance: the routing of every validation token (no router jitter),
    per MoE layer, like the train record's expert_load / imbalance."""
    assert trainer.data.val
    model = trainer.backend.raw_model
    model.eval()
    record: dict[str, Any] = {"kind": "eval", "step": trainer.step, "tokens": trainer.tokens}
    losses = []
    counts_LE: torch.Tensor | None = None
    for name, blocks in trainer.data.val.items():
        loss, _, set_counts = _eval_set(trainer, blocks)
        losses.append(loss)
        record[f"val/{name}/loss"] = loss
        record[f"val/{name}/ppl"] = math.exp(min(loss, 50.0))
        if set_counts is not None:
            counts_LE = set_counts if counts_LE is None else counts_LE + set_counts
    model.train()
    val_loss = sum(losses) / len(losses)
    record.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
    if trainer.chat is not None:  # which tokens of a conversation the losses are over
        record["loss_on"] = loss_on(trainer.cfg)
    moe_layers, experts = len(trainer.cfg.model.moe_layer_indices), trainer.cfg.model.num_experts
    if moe_layers:  # decided by the config, so every rank takes part in the reduction
        if counts_LE is None:
            counts_LE = torch.zeros(moe_layers, experts, device=trainer.backend.device)
        counts_LE = trainer.backend.all_reduce(counts_LE, "sum").double()
        load_LE = counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp_min(1)
        record["val_expert_load"] = [[round(float(v), 5) for v in row] for row in load_LE]
        record["val_imbalance"] = [round(float(v), 4) for v in load_LE.max(dim=1).values * load_LE.shape[1]]
    return record


def load_summary(imbalance: list[float]) -> str:
    """One line: each MoE layer's max/mean expert load (1.00 = balanced), and the worst layer."""
    worst = max(range(len(imbalance)), key=lambda i: imbalance[i])
    per_layer = " ".join(f"{v:.2f}" for v in imbalance)
    return f"expert load max/mean per MoE layer: {per_layer} (1.00 = balanced; worst: MoE layer {worst})"


@torch.no_grad()
def _eval_set(trainer: Trainer, blocks: Any) -> tuple[float, int, torch.Tensor | None]:
    """(mean loss, tokens) of one validation set over every rank, and this rank's routed counts."""
    b, cfg = trainer.backend, trainer.cfg
    # [sum of token losses, tokens], on the device; float64 so that the sum does not depend on
    # how the blocks are split over ranks. train.eval_batches counts the batches of all ranks.
    total = torch.zeros(2, dtype=torch.float64, device=b.device)
    counts_LE: torch.Tensor | None = None
    for batch in eval_batches(
        blocks, cfg.train.micro_batch_size, b.dp_rank, b.dp_size, cfg.train.eval_batches
    ):
        with b.autocast():
            out = trainer.forward(b.raw_model, batch)
        assert out.lm_loss is not None
        tokens = int((batch[1] != -100).sum())  # labels are still on the CPU: no device sync
        if tokens:
            total[0] += out.lm_loss.double() * tokens
            total[1] += tokens
        if out.expert_counts_LE is not None:
            step_counts = out.expert_counts_LE.detach().float()
            counts_LE = step_counts if counts_LE is None else counts_LE + step_counts
    total = b.all_reduce(total, "sum")
    return float(total[0] / total[1]), int(total[1]), counts_LE


def loss_on(cfg: Any) -> str:
    """What the loss of a conversation is averaged over (data.train_on): "assistant" tokens or "all"."""
    return str(cfg.data.train_on or "assistant")


@torch.no_grad()
def sample(trainer: Trainer) -> str:
    """`train.sample_tokens` tokens after `train.sample_prompt`, from the model as it is now. With
    conversations the prompt is a user turn in the chat template, and the reply stops at its end."""
    cfg, b, tokenizer = trainer.cfg, trainer.backend, trainer.tokenizer
    if trainer.chat is not None:
        prompt = trainer.chat.prompt_ids([{"role": "user", "content": cfg.train.sample_prompt}])
    else:
        prompt = tokenizer.encode(cfg.train.sample_prompt) or [tokenizer.bos_id]
    eos = tokenizer.eos_id if trainer.chat is not None else None
    # A generator of its own: sampling must not move the training RNG (exact resume).
    gen = torch.Generator(device=b.device).manual_seed(cfg.train.seed + trainer.step)
    ids = torch.tensor([prompt], device=b.device)
    with b.autocast():
        out = b.raw_model.generate(
            ids, cfg.train.sample_tokens, temperature=0.8, top_k=50, eos_id=eos, generator=gen
        )
    return tokenizer.decode(out[0].tolist())
