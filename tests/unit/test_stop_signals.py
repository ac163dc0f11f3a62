"""The trainer's stop signals (moe_lm/train/trainer.py StopRequested), without a training run."""

from __future__ import annotations

import os
import signal

import pytest

from moe_lm.train.trainer import StopRequested


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_each_stop_signal_asks_for_a_checkpoint_instead_of_ending_the_process(sig: signal.Signals) -> None:
    # SIGHUP as well: `moe-lm launch` and torchrun pass it on to the workers, whose default action
    # for it was to die with nothing saved
    before = signal.signal(sig, lambda signum, frame: None)  # without StopRequested: not a death
    try:
        with StopRequested() as stop:
            os.kill(os.getpid(), sig)
            assert stop.requested
    finally:
        signal.signal(sig, before)


def test_a_sighup_ignored_by_nohup_stays_ignored() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopRequested() as stop:
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert not stop.requested
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
