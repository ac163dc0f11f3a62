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


@pytest.mark.parametrize("under_launch", [True, False], ids=["moe-lm-launch-worker", "in-process"])
def test_a_worker_that_stopped_ignores_late_copies_of_the_signal(under_launch: bool, monkeypatch) -> None:
    # torchrun sends its workers the signal again when a second one reaches it: with the default
    # action back, that copy killed a worker after its checkpoint, before its exit report. In-process
    # (a notebook, a test) the handlers are given back as they were.
    from moe_lm.errors import ERROR_DIR_ENV

    if under_launch:
        monkeypatch.setenv(ERROR_DIR_ENV, "/nonexistent")
    else:
        monkeypatch.delenv(ERROR_DIR_ENV, raising=False)
    late: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: late.append(signum))
    try:
        with StopRequested() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # the late copy, after the checkpoint
        assert late == ([] if under_launch else [signal.SIGTERM])
    finally:
        signal.signal(signal.SIGTERM, before)
