"""The forward half of the GPU code path on fake CUDA tensors: needs a CUDA build of torch and no GPU
(`make test-fake-cuda` installs one beside the CPU venv; skipped everywhere else).

With a CUDA build, fake CUDA tensors take every CUDA-only branch a forward pass has: `x.is_cuda`
picks the grouped GEMM, `torch.autocast("cuda")` casts as on a GPU, SDPA dispatches its CUDA
kernels, and a CPU tensor mixed into any of them fails here. The backward cannot run (torch's
autograd engine asks the CUDA driver for a device); `moe-lm plan` rehearses it on fake CPU tensors
(docs/gpu.md). configs/gpu-check.yaml and configs/moe-1b.yaml, in bf16, at world sizes 1, 8 and 64
(EP 8): the training forward with its router losses, the counting pass of global-batch balancing,
an evaluation forward and sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_lm.config import load_config
from moe_lm.model.params import build_meta_model
from moe_lm.model.split_sizes import assumed_splits
from moe_lm.parallel.expert_parallel import apply_expert_parallel
from moe_lm.parallel.mesh import build_mesh
from moe_lm.plan.fake import RehearsalMode, fake_world
from moe_lm.plan.routing import AssumedRouting
from tests.integration.conftest import REPO

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None or torch.cuda.is_available(),
    reason="needs a CUDA build of torch on a machine without a GPU (make test-fake-cuda)",
)


class _Event:
    """torch.cuda.Event needs a device; the all-to-all timing (expert_parallel.EPStats) only records."""

    def __init__(self, enable_timing: bool = False) -> None:
        pass

    def record(self) -> None:
        pass


@contextmanager
def cuda_autocast_without_a_gpu() -> Iterator[None]:
    """torch.autocast("cuda") refuses itself when no device answers; the dispatch it sets up needs none."""
    with (
        mock.patch("torch.cuda.amp.common.amp_definitely_not_available", lambda: False),
        mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
        mock.patch("torch.cuda.Event", _Event),
        torch.autocast("cuda", dtype=torch.bfloat16),
    ):
        yield


@pytest.mark.parametrize(
    ("config", "world", "ep"),
    [("gpu-check", 1, 1), ("gpu-check", 8, 8), ("moe-1b", 8, 8), ("moe-1b", 64, 8)],
)
def test_forward_eval_and_sampling_on_fake_cuda(config: str, world: int, ep: int) -> None:
    cfg = load_config(REPO / "configs" / f"{config}.yaml", [f"parallel.ep_size={ep}"])
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, num_layers=2))  # every layer is alike
    meta = build_meta_model(cfg.model)
    mode = RehearsalMode(1e15, 3e12, half_precision_attention=True)
    with fake_world(world, 0), FakeTensorMode(allow_non_fake_inputs=True), mode:
        mesh = build_mesh(ep, cfg.model.num_experts)
        model = meta.to_empty(device="cuda")
        apply_expert_parallel(model, mesh)
        ids = torch.zeros(2, cfg.data.seq_len, dtype=torch.long, device="cuda")
        with assumed_splits(AssumedRouting(cfg.model.num_experts).reader(ep, 0)):
            with cuda_autocast_without_a_gpu(), mode.counting() as counts:
                out = model(ids, labels=ids, return_logits=False)
                counted = model.route_counts(ids)
            assert out.loss is not None and out.loss.device.type == "cuda"
            assert out.loss.dtype == torch.float32 and out.expert_counts_LE.device.type == "cuda"
            assert counted.shape == (2, cfg.model.num_experts)
            # the CUDA decision itself: fp32 activations under bf16 autocast take the grouped GEMM
            assert counts.grouped_mm_calls == 2 * 2 * 2  # 2 GEMMs x 2 layers x (training + counting pass)
            model.eval()
            with torch.no_grad(), cuda_autocast_without_a_gpu():
                assert model(ids, labels=ids).lm_loss.device.type == "cuda"
                tokens = model.generate(ids[:1, :8], 2, temperature=0.8, top_k=50)
            assert tokens.shape == (1, 10) and tokens.device.type == "cuda"
