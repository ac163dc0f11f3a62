"""GPU checks: bf16 against fp32 for the same weights and batch, and the trainer on the device.

The CUDA cases skip on machines without CUDA; run them where a GPU is lent (`make gpu-check`). The
comparisons also run on the CPU (bf16 there too), so the logic and the tolerances below are
exercised by every run of the suite.

The tolerances are a few times the bf16 error measured on the CPU (torch 2.13), with:
    OMP_NUM_THREADS=1 .venv/bin/python -c "from tests.gpu.test_cuda import *; \
        print(max(max(experts_bf16_errors('cpu', i, s)) for i in IMPLS for s in range(3)))"
    OMP_NUM_THREADS=1 .venv/bin/python -c "from tests.gpu.test_cuda import *; import tempfile; \
        print(max(trainer_bf16_eval_error(tempfile.mkdtemp(), s) for s in range(8)))"
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_lm.model.dispatch import LocalDispatcher
from moe_lm.model.experts import Experts
from tests.conftest import tiny_model_config

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
IMPLS = ["grouped_mm", "loop"]
# ‖bf16 − fp32‖ / ‖fp32‖ of the experts' output and input gradient, seeds 0-2: 5.9e-3-6.1e-3 and
# 6.8e-3-7.4e-3 (both impls alike). A norm ratio, not an elementwise atol: at atol 5e-2 a gradient of
# mean magnitude 6e-3 passed scaled by 0.6; here one scaled by 0.97 fails.
EXPERTS_REL_TOL = 2e-2
# |val_loss of `evaluate` in bf16 autocast − the same weights and batches in fp32, computed here| after
# 6 bf16 steps, seeds 0-7: 4.8e-6 to 1.7e-4, on a loss of 5.6. bf16's own resolution there is far
# coarser: its numbers in [4, 8) are 2**-5 apart, so a loss rounded to bf16 on the way (in the loss or
# the mean over the batches) would be off by up to half that, BF16_HALF_ULP_AT_LOSS = 1.56e-2, 31x this
# tolerance; the loss is summed in fp32 from the bf16 logits, and only their error shows.
EVAL_ABS_TOL = 5e-4
BF16_HALF_ULP_AT_LOSS = 2.0**-6


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def _experts_pass(
    experts: Experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    y, _ = LocalDispatcher()(x, idx, w, experts, experts.num_experts, None)
    y.float().square().sum().backward()
    assert x.grad is not None
    return y.detach().float(), x.grad.float()


def experts_bf16_errors(device: str, impl: str, seed: int = 0) -> tuple[float, float]:
    """(output, input gradient) of the experts in bf16 against fp32, same weights and batch: relative errors."""
    torch.manual_seed(seed)
    fp32 = Experts(8, 64, 96, impl="loop").to(device)
    torch.nn.init.normal_(fp32.gate_up_proj, std=0.05)
    torch.nn.init.normal_(fp32.down_proj, std=0.05)
    x = torch.randn(512, 64, device=device)
    idx = torch.randint(0, 8, (512, 2), device=device)
    w = torch.softmax(torch.randn(512, 2, device=device), -1)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    bf16.impl = impl
    y_ref, dx_ref = _experts_pass(fp32, x, idx, w)
    y, dx = _experts_pass(bf16, x.to(torch.bfloat16), idx, w)
    return rel_err(y, y_ref), rel_err(dx, dx_ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_experts_match_fp32(device: str, impl: str) -> None:
    out_err, grad_err = experts_bf16_errors(device, impl)
    assert out_err < EXPERTS_REL_TOL and grad_err < EXPERTS_REL_TOL, (out_err, grad_err)


@CUDA
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


def bf16_trainer(tmp_path: Path, seed: int = 0) -> Any:
    """A Trainer of the integration tests' tiny run in bf16 (with router jitter), on the device it picks."""
    from moe_lm.config import config_from_dict
    from moe_lm.data.tokenizer import train_tokenizer
    from moe_lm.train.trainer import Trainer
    from tests.integration.conftest import REPO, run_config_dict

    tmp_path = Path(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:60_000])
    tokenizer = train_tokenizer([str(corpus)], 384, tmp_path / "tokenizer")
    cfg = config_from_dict(
        run_config_dict(
            corpus,
            tokenizer,
            tmp_path / "run",
            model={"router_jitter": 0.1},
            train={"mixed_precision": "bf16", "seed": seed, "overwrite": True},
        )
    )
    return Trainer(cfg)


def fp32_val_loss(trainer: Any) -> float:
    """val_loss computed here, not by `evaluate`: a plain fp32 copy of the trainer's model (accelerate
    puts its autocast into the prepared model's own forward), the same batches, cross-entropy summed
    over the labelled tokens of each validation set, then the mean over the sets."""
    import torch.nn.functional as F

    from moe_lm.data.loader import eval_batches
    from moe_lm.model import MoETransformer

    cfg, device = trainer.cfg, trainer.backend.device
    plain = MoETransformer(cfg.model).to(device).eval()
    plain.load_state_dict(trainer.backend.raw_model.state_dict())
    losses = []
    with torch.no_grad():
        for blocks in trainer.data.val.values():
            total, tokens = 0.0, 0
            for input_ids, labels in eval_batches(
                blocks, cfg.train.micro_batch_size, 0, 1, cfg.train.eval_batches
            ):
                logits = trainer.forward(plain, input_ids, labels).logits
                labels = labels.to(device).flatten()
                total += F.cross_entropy(
                    logits.flatten(0, 1).double(), labels, ignore_index=-100, reduction="sum"
                ).item()
                tokens += int((labels != -100).sum())
            losses.append(total / tokens)
    return sum(losses) / len(losses)


def trainer_bf16_eval_error(tmp_path: Path | str, seed: int = 0) -> float:
    """|val loss of `evaluate` in bf16 − in fp32| after 6 bf16 steps (the measurement behind EVAL_ABS_TOL)."""
    from moe_lm.train.evaluation import evaluate

    trainer = bf16_trainer(Path(tmp_path), seed)
    try:
        for _ in range(6):
            trainer.train_step()
        return abs(evaluate(trainer)["val_loss"] - fp32_val_loss(trainer))
    finally:
        trainer.log.close()
        trainer.backend.shutdown()


def test_the_eval_tolerance_is_far_below_a_bf16_rounded_loss() -> None:
    loss = torch.tensor(5.6, dtype=torch.bfloat16)
    above = torch.nextafter(loss, torch.tensor(math.inf, dtype=torch.bfloat16))
    assert (above.double() - loss.double()).item() / 2 == BF16_HALF_ULP_AT_LOSS == 1.5625e-2
    assert EVAL_ABS_TOL * 30 < BF16_HALF_ULP_AT_LOSS


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one state per process whose mixed precision cannot change once set (its own
    tests reset it the same way): the bf16 trainer here neither inherits one nor leaves its own to the
    tests after it, which train in fp32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_trainer_step_eval_and_sample_on_the_device(tmp_path: Path) -> None:
    # The trainer's own paths on a real device: a CPU tensor mixed into them fails only on a GPU
    # (where there is none, the same run on the CPU checks the comparison).
    from moe_lm.train.evaluation import evaluate, sample

    trainer = bf16_trainer(tmp_path)
    cfg = trainer.cfg
    try:
        first = trainer.train_step()
        for _ in range(5):
            trainer.train_step()
        assert trainer.backend.device.type == ("cuda" if HAS_CUDA else "cpu")
        assert first.grad_norm > 0 and torch.isfinite(first.losses["loss"])
        record, want = evaluate(trainer), fp32_val_loss(trainer)
        assert abs(record["val_loss"] - want) < EVAL_ABS_TOL, (record["val_loss"], want)
        assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]), rel=1e-12)
        assert sample(trainer).startswith(cfg.train.sample_prompt[:3])
    finally:
        trainer.log.close()
        trainer.backend.shutdown()
