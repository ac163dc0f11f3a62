"""GPU checks: skipped on machines without CUDA (CI has none); run them where a GPU is lent."""

from __future__ import annotations

import pytest
import torch

from moe_lm.model.dispatch import LocalDispatcher
from moe_lm.model.experts import Experts
from tests.conftest import tiny_model_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_grouped_mm_experts_match_the_loop_in_bf16() -> None:
    torch.manual_seed(0)
    experts = Experts(8, 64, 96).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    x = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randint(0, 8, (512, 2), device="cuda")
    w = torch.softmax(torch.randn(512, 2, device="cuda"), -1)
    outs, grads = [], []
    for impl in ("grouped_mm", "loop"):
        experts.impl = impl
        x.grad = None
        y, _ = LocalDispatcher()(x, idx, w, experts, 8, None)
        y.float().square().sum().backward()
        outs.append(y.float())
        assert x.grad is not None
        grads.append(x.grad.float())
    assert torch.allclose(outs[0], outs[1], atol=2e-2, rtol=2e-2)
    assert torch.allclose(grads[0], grads[1], atol=5e-2, rtol=5e-2)


def test_bf16_training_steps_lower_the_loss() -> None:
    from moe_lm.model import MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(tiny_model_config()).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    ids = torch.randint(0, 128, (8, 64), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        assert out.loss is not None
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0] - 0.5


def test_trainer_step_eval_and_sample_on_cuda(tmp_path) -> None:
    # The trainer's own paths on a real device: a CPU tensor mixed into them fails only here.
    from moe_lm.config import config_from_dict
    from moe_lm.data.tokenizer import train_tokenizer
    from moe_lm.train.evaluation import evaluate, sample
    from moe_lm.train.trainer import Trainer
    from tests.integration.conftest import REPO, run_config_dict

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    tokenizer = train_tokenizer([str(corpus)], 384, tmp_path / "tokenizer")
    cfg = config_from_dict(
        run_config_dict(
            corpus,
            tokenizer,
            tmp_path / "run",
            model={"router_jitter": 0.1},
            train={"mixed_precision": "bf16"},
        )
    )
    trainer = Trainer(cfg)
    try:
        first = trainer.train_step()
        for _ in range(5):
            trainer.train_step()
        assert trainer.backend.device.type == "cuda"
        assert first.grad_norm > 0 and torch.isfinite(first.losses["loss"])
        record = evaluate(trainer)
        assert 0 < record["val_loss"] < 10
        assert sample(trainer).startswith(cfg.train.sample_prompt[:3])
    finally:
        trainer.log.close()
        trainer.backend.shutdown()
