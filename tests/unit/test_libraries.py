"""Library settings: DeepSpeed's op cache lives in this environment, and its known-harmless noise is dropped."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_lm import libraries


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_deepspeed_ops_are_cached_inside_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    """Two environments shared ~/.cache/torch_extensions and rebuilt the op over each other (3 min)."""
    import os

    libraries.configure_deepspeed()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    clean_env.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    libraries.configure_deepspeed()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"  # a user's own choice wins


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed picks CUDA by itself")
def test_cpu_machines_name_deepspeeds_accelerator(clean_env: pytest.MonkeyPatch) -> None:
    import os

    libraries.configure_deepspeed()
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_warm_deepspeed_ops_builds_into_the_environments_cache(
    clean_env: pytest.MonkeyPatch,
) -> None:
    import deepspeed.accelerator

    from moe_lm.parallel.deepspeed_backend import warm_deepspeed_ops

    seen: list[str | None] = []

    class Builder:
        def load(self, verbose: bool = True) -> None:
            import os

            seen.append(os.environ.get("TORCH_EXTENSIONS_DIR"))

    class Accelerator:
        def create_op_builder(self, name: str) -> Any:
            assert name == "ShareMemCommBuilder"
            return Builder()

    clean_env.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    warm_deepspeed_ops()
    assert seen == [str(Path(sys.prefix) / "torch_extensions")]


def test_torchs_deprecation_of_zeros_collectives_is_not_shown(clean_env: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        libraries.configure_deepspeed()
        warnings.warn(
            "`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_drop_build_notice_keeps_everything_else(capsys: pytest.CaptureFixture[str]) -> None:
    with libraries.drop_build_notice():
        print("before")
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("after")
    assert capsys.readouterr().out == "before\nafter\n"
