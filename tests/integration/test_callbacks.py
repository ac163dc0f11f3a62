"""The loop's fixed points: which callback runs when, in which order, and what the extension points add."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_lm.config import Config
from moe_lm.train.callbacks import Callback, Evaluate, LogMetrics, default_callbacks
from moe_lm.train.sinks import Sink
from moe_lm.train.trainer import StepResult, Trainer


class Recorder(Callback):
    """Last in the list: sees every point after the default callbacks have run at it."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.summary: dict[str, Any] = {}

    def pre_train(self, trainer: Trainer) -> None:
        self.events.append(f"pre_train {trainer.step}")

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        self.events.append(f"post_step {trainer.step}")

    def on_record(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.events.append(f"{record['kind']} {record['step']}")

    def post_train(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        self.events.append(f"post_train {trainer.step}")
        self.summary = dict(summary)


def fit(cfg: Config, callbacks: list[Callback]) -> Trainer:
    trainer = Trainer(cfg, callbacks=callbacks)
    try:
        trainer.fit()
    finally:
        trainer.backend.shutdown()
    return trainer


def checkpoints(cfg: Config) -> list[str]:
    return sorted(p.name for p in (cfg.output_dir / "checkpoints").glob("step-*"))


def test_points_run_in_order_and_the_default_callbacks_at_their_steps(make_config) -> None:
    cfg = make_config(
        train={"max_steps": 4, "eval_every": 2, "sample_every": 2},
        logging={"log_every": 2},
        checkpoint={"every": 2, "keep_last": 5},
    )
    rec = Recorder()
    fit(cfg, [*default_callbacks(cfg), rec])
    assert rec.events == [
        "eval 0",  # the starting point, from Evaluate.pre_train
        "pre_train 0",
        "train 1",  # step 1 is always logged
        "post_step 1",
        "train 2",
        "eval 2",
        "sample 2",
        "post_step 2",  # after the periodic checkpoint
        "post_step 3",
        "train 4",
        "sample 4",  # no eval at the last step: the final one follows
        "post_step 4",
        "eval 4",
        "sample 4",
        "post_train 4",
    ]
    # Evaluate, Sample and Checkpoint ran at post_train before the recorder, in that order.
    assert rec.summary["finished"] and rec.summary["val_loss"] > 0 and rec.summary["sample"]
    assert rec.summary["final_checkpoint"] == cfg.output_dir / "checkpoints" / "step-4"
    assert checkpoints(cfg) == ["step-2", "step-4"]
    state = json.loads((cfg.output_dir / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert state["val_loss"] == rec.summary["val_loss"]  # the final checkpoint carries the final eval
    assert state["last_metrics"]["step"] == 4


def test_a_stop_ends_without_the_final_eval_and_saves_that_step(make_config) -> None:
    cfg = make_config(train={"max_steps": 6, "stop_at_step": 3, "eval_every": 2}, checkpoint={"every": 2})
    rec = Recorder()
    fit(cfg, [*default_callbacks(cfg), rec])
    assert rec.events[-3:] == ["train 3", "post_step 3", "post_train 3"]
    assert not rec.summary["finished"] and "val_loss" not in rec.summary
    assert checkpoints(cfg) == ["step-2", "step-3"]


def test_train_step_returns_a_step_result(make_config) -> None:
    cfg = make_config(model={"capacity_factor": 1.0}, train={"grad_accum_steps": 2})
    trainer = Trainer(cfg)
    try:
        result = trainer.train_step()
    finally:
        trainer.log.close()
        trainer.backend.shutdown()
    assert isinstance(result, StepResult) and result.stepped and result.finite
    assert list(result.losses) == ["loss", "lm_loss", "aux_loss", "hf_aux_loss", "z_loss"]
    assert result.grad_norm > 0 and result.seconds > 0
    assert result.expert_counts_LE is not None and result.dropped_L is not None
    assert result.expert_counts_LE.shape == (cfg.model.num_layers, cfg.model.num_experts)
    # Each layer routes every token of both micro-batches top_k times, kept or dropped.
    tokens = 2 * cfg.train.micro_batch_size * cfg.data.seq_len * cfg.model.top_k
    assert torch.equal(
        result.expert_counts_LE.sum(dim=1), torch.full((2,), tokens, dtype=result.expert_counts_LE.dtype)
    )


class ListSink(Sink):
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)


class AddSink(Callback):
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def pre_train(self, trainer: Trainer) -> None:
        trainer.log.sinks.append(self.sink)


def test_extra_metrics_and_a_new_sink(make_config) -> None:
    cfg = make_config(train={"max_steps": 2, "eval_every": 1})
    sink = ListSink()
    callbacks = [
        AddSink(sink),
        LogMetrics(1, extra=[lambda trainer, result: {"stepped": result.stepped}]),
        Evaluate(1, extra=[lambda trainer: {"double_val": 2 * trainer.step}]),
        *(c for c in default_callbacks(cfg) if not isinstance(c, LogMetrics | Evaluate)),
    ]
    fit(cfg, callbacks)
    lines = [json.loads(line) for line in Path(cfg.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [
        ("eval", 0),
        ("train", 1),
        ("eval", 1),
        ("train", 2),
        ("eval", 2),
        ("sample", 2),  # the final sample, after the final eval
    ]
    assert all(r["stepped"] is True for r in lines if r["kind"] == "train")
    assert [r["double_val"] for r in lines if r["kind"] == "eval"] == [0, 2, 4]
    assert sink.records == lines  # the new sink saw every record metrics.jsonl got


class SignalsTwice(Callback):
    """Ctrl-C during step 2, and again at the end, before the checkpoint is written (as a scheduler
    that signals a process and its group, or `moe-lm launch` passing a signal on, delivers it)."""

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    def post_train(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        os.kill(os.getpid(), signal.SIGINT)


def test_a_second_stop_signal_does_not_interrupt_the_checkpoint_the_first_asked_for(make_config) -> None:
    """Was: the trainer restored the default handlers before the final callbacks, so the second
    signal raised KeyboardInterrupt in them and the stop's checkpoint was never written."""
    cfg = make_config(train={"max_steps": 6}, checkpoint={"every": 0})
    try:
        fit(cfg, [SignalsTwice(), *default_callbacks(cfg)])
    except KeyboardInterrupt:  # pytest would end the whole session on it
        pytest.fail("the second SIGINT interrupted the final callbacks")
    assert checkpoints(cfg) == ["step-2"]
