"""Every tensor the trainer's step, evaluation and sampling create is made on the backend's device.

On a GPU a tensor made without `device=` lands on the CPU, and mixing it with CUDA tensors fails
(evaluation once crashed at step 0 that way). Running on a CPU cannot show that, so a
TorchFunctionMode records each factory call (torch.tensor, zeros, arange, randn, ...) made directly
from moe_lm code without a device. moe_lm/data is exempt: the loader builds its batches on the CPU
on purpose and the trainer moves them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import moe_lm

PACKAGE = Path(moe_lm.__file__).resolve().parent
EXEMPT = PACKAGE / "data"


class FactoryCallsWithoutDevice(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._factories = _device_constructors()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in self._factories and kwargs.get("device") is None:
            caller = Path(sys._getframe(1).f_code.co_filename).resolve()
            if caller.is_relative_to(PACKAGE) and not caller.is_relative_to(EXEMPT):
                self.found.append(
                    f"{caller.relative_to(PACKAGE)}:{sys._getframe(1).f_lineno} {func.__name__}"
                )
        return func(*args, **kwargs)


def test_the_checker_sees_a_factory_call_without_device() -> None:
    from moe_lm.model import losses

    with FactoryCallsWithoutDevice() as check:
        torch.tensor(1.0)  # from a test: not moe_lm code
        losses.imbalance(torch.tensor([1, 2]))
    assert check.found == []
    with FactoryCallsWithoutDevice() as check:
        exec(compile("torch.zeros(2)", str(PACKAGE / "train" / "x.py"), "exec"), {"torch": torch})
    assert check.found == ["train/x.py:1 zeros"]


@pytest.mark.parametrize(
    "model",
    [{}, {"router_jitter": 0.1, "capacity_factor": 1.0, "aux_free_bias": True}],
    ids=["dropless", "jitter-capacity-auxfree"],
)
def test_step_eval_and_sample_make_tensors_on_the_device(make_config, model: dict[str, Any]) -> None:
    from moe_lm.train.evaluation import evaluate, sample
    from moe_lm.train.trainer import Trainer

    cfg = make_config(model=model, train={"grad_accum_steps": 2, "eval_batches": 2})
    trainer = Trainer(cfg)
    try:
        with FactoryCallsWithoutDevice() as check:
            trainer.train_step()
            evaluate(trainer)
            sample(trainer)
    finally:
        trainer.log.close()
        trainer.backend.shutdown()
    assert check.found == []
