"""The training loop. It only loops: it steps, counts, guards against non-finite steps and stops;
logging, evaluation, samples and checkpoints are callbacks (`moe_lm/train/callbacks.py`) it calls
at fixed points, and processes, checkpoint format, metrics and data live in their own modules.

One optimizer step (`moe_lm/train/step.py`) = grad_accum_steps micro-batches on every
data-parallel rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from moe_lm.config import Config
from moe_lm.data.blocks import batch_document_ids
from moe_lm.data.chat import chat_encoder
from moe_lm.data.corpus import open_data
from moe_lm.data.loader import ResumableLoader
from moe_lm.data.tokenizer import Tokenizer, check_vocab, ensure_tokenizer
from moe_lm.errors import ERROR_DIR_ENV, UserError
from moe_lm.fsutil import DiskFullError
from moe_lm.model import MoETransformer
from moe_lm.parallel.layout import Layout, start_processes
from moe_lm.parallel.parallelize import build_backend
from moe_lm.state import checkpoint as ckpt
from moe_lm.state.resolve import resolve_resume
from moe_lm.state.run_state import DATA_POSITION
from moe_lm.state.write_errors import explain_disk_full
from moe_lm.train.callbacks import Callback, Record, default_callbacks
from moe_lm.train.optim import apply_freeze, lr_lambda, optimizer_factory, param_groups
from moe_lm.train.preflight import check_memory
from moe_lm.train.rng import TrainingRNG
from moe_lm.train.rundir import commit_run_dir, prepare_run_dir
from moe_lm.train.sinks import build_logger
from moe_lm.train.step import StepResult, train_step
from moe_lm.train.step import forward as step_forward


@contextmanager
def disk_full_context(cfg: Config) -> Iterator[None]:
    """A full disk met by the token store or metrics.jsonl: say which checkpoint survives and how
    to continue (a checkpoint write's own error says so already)."""
    try:
        yield
    except DiskFullError as e:
        raise explain_disk_full(e, cfg.output_dir / "checkpoints") from None


class StopRequested:
    """SIGTERM / SIGINT / SIGHUP (preemption, Ctrl-C, a closed terminal or ssh session) asks for a
    checkpoint at the next step boundary. SIGHUP too because `moe-lm launch` passes on the three
    (moe_lm/cli/launch.py) and torchrun sends its workers the signal it got: with the default
    action a SIGHUP killed every process with nothing saved. A SIGHUP already ignored (nohup) stays
    ignored."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        # A worker of `moe-lm launch` that stopped keeps ignoring stop signals until it exits: when
        # a second signal reaches torchrun, its wait for the workers restarts and sends them the
        # signal again, and that late copy killed a process between its checkpoint and its exit
        # report (rankN.exit): a clean stop reported as 'killed' (exit 143).
        linger = self.requested and bool(os.environ.get(ERROR_DIR_ENV))
        for sig, handler in self._previous.items():
            signal.signal(sig, self._handle if linger else handler)


class Trainer:
    def __init__(
        self, cfg: Config, layout: Layout | None = None, callbacks: Sequence[Callback] | None = None
    ) -> None:
        """`layout`: the processes this run has joined (`moe-lm train` starts them itself, to end
        them itself); by default the trainer joins them here. `callbacks`: what `fit` calls at its
        fixed points, in order; by default `default_callbacks(cfg)`."""
        self.cfg = cfg
        layout = layout if layout is not None else start_processes(cfg)
        resumed_from = prepare_run_dir(cfg, layout.is_main)
        if layout.is_main and layout.device.type == "cpu":  # GPU runs: the plan, in `moe-lm train`
            check_memory(cfg, layout.world_size, layout.device)
        layout.barrier("checking the run directory")

        if layout.is_main:
            ensure_tokenizer(cfg)
        layout.barrier("preparing the tokenizer")
        self.tokenizer = Tokenizer.load(cfg.data.tokenizer)
        check_vocab(self.tokenizer, cfg.model.vocab_size)
        # The first run prepares the token store: one process per node (nodes may not share
        # data.cache_dir; where they do, the store's lock lets one tokenise and the other find it
        # done). Every process then reads its blocks by memory map.
        local_main = bool(layout.accelerator.is_local_main_process)
        with disk_full_context(cfg):
            self.data = open_data(cfg, self.tokenizer, is_main=local_main, waits=layout.waits)
        # Conversations: the samples are chat replies, rendered by the tokenizer's chat template.
        self.chat = chat_encoder(self.tokenizer) if self.data.chat else None

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = MoETransformer(cfg.model)
        apply_freeze(model, cfg.train.freeze)
        self.backend = build_backend(
            cfg,
            layout,
            model,
            param_groups(model, cfg.optim.weight_decay),
            optimizer_factory(cfg.optim),
            lr_lambda(cfg.optim, cfg.train),
        )
        b = self.backend
        self.rng = TrainingRNG(cfg.train.seed + b.rank, b.device)  # per-rank streams (router jitter)

        self.loader = ResumableLoader(
            self.data.train, cfg.train.micro_batch_size, b.dp_rank, b.dp_size, cfg.train.seed
        )
        self.step, self.tokens = 0, 0
        self.resume_notes: list[str] = []  # what the resume changed, said once the log is up
        if cfg.train.init_from and resumed_from is None:  # resume=auto's requeues continue the run
            init = resolve_resume(cfg.train.init_from, cfg.output_dir, key="train.init_from")
            ckpt.load_checkpoint(cfg, b, init, weights_only=True)
        if resumed_from is not None:  # what the Checkpoint callback saved
            self._resume(resumed_from)
        commit_run_dir(cfg, resumed_from, b.is_main)  # only now that every input has loaded
        b.barrier("loading the model and its checkpoint")
        self.resumed_from = resumed_from
        self.tokens_per_step = (
            cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps * b.dp_size
        )
        self.log = build_logger(cfg, self.step, resumed_from is not None, b.is_main)
        self.callbacks = list(callbacks) if callbacks is not None else default_callbacks(cfg)
        self.nonfinite_in_row = 0
        # The newest checkpoint written while every step was finite: where to go back to after a divergence.
        self.last_good_checkpoint: Path | None = resumed_from

    def _resume(self, path: Path) -> None:
        """Weights, optimizer, step, the global data position and (same topology) the RNG stream."""
        state = ckpt.load_checkpoint(self.cfg, self.backend, path)
        assert state is not None
        self.step, self.tokens = int(state.trainer["step"]), int(state.trainer["tokens"])
        position = state.data_position if state.data_position is not None else state.legacy_loader_states
        if not position and self.step > 0:  # a lost file must not send the run back to its first samples
            if not self.cfg.train.accept_changed_data:
                raise UserError(
                    f"checkpoint {path} has no {DATA_POSITION}, so where the data stood at step {self.step} is "
                    "unknown and resuming would re-train from the first samples; restore the file, resume from "
                    "another step (train.resume=PATH/step-N), or set train.accept_changed_data=true to start the "
                    "data over"
                )
            self.resume_notes.append(
                f"train.accept_changed_data: checkpoint {path} has no {DATA_POSITION}; the data starts over"
            )
        if position:
            self.resume_notes += self.loader.load_state_dict(position, self.cfg.train.accept_changed_data)
            if self.loader.changed_sources:
                sizes = ", ".join(f"{name} {len(blocks)} blocks" for name, blocks in self.data.val.items())
                self.resume_notes.append(
                    f"validation re-cut from the new data: {sizes or 'no validation set'}"
                )
        # The RNG stream only continues exactly on the same topology; elsewhere it starts from the seed.
        if state.rng is not None:
            self.rng.load_state_dict(state.rng)

    # ---- one optimizer step -------------------------------------------------------------------

    def document_ids(self, batch: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The batch's document ids on the CPU (moe_lm.data.blocks.batch_document_ids)."""
        return batch_document_ids(batch, self.tokenizer.eos_id, self.cfg.data.document_mask)

    def forward(
        self,
        model: Any,
        batch: Sequence[torch.Tensor] | torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """`model` (wrapped for training, raw for evaluation) on a batch from the CPU: the loader's
        (input_ids, labels) pair (moe_lm.data.blocks.Batch), or input_ids and `labels`."""
        return step_forward(
            self.cfg, self.backend.device, self.tokenizer.eos_id, model, batch, labels, **kwargs
        )

    def train_step(self) -> StepResult:
        start = time.perf_counter()
        with self.rng.active():  # only the step draws from the training stream
            # All of the step's micro-batches first: global-batch balancing may count them before any runs.
            batches = [self.loader.next_batch() for _ in range(self.cfg.train.grad_accum_steps)]
            return train_step(
                self.backend, self.cfg, batches, self.tokenizer.eos_id, self.step + 1, start, self.data.packed
            )

    def _guard(self, result: StepResult) -> None:
        """Non-finite loss or gradient: the update was skipped; too many in a row stops the run."""
        if result.finite:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_in_row += 1
        self.log.message(f"warning: step {self.step}: non-finite loss or gradient norm; update skipped")
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            raise UserError(
                f"training diverged: {self.nonfinite_in_row} non-finite steps in a row ending at step {self.step}; "
                f"last good checkpoint: {self.last_good_checkpoint or 'none'}; lower optim.lr or raise "
                "optim.warmup_steps and resume from it"
            )

    # ---- the loop -----------------------------------------------------------------------------

    def done(self) -> bool:
        t = self.cfg.train
        return self.step >= t.max_steps or (t.max_tokens is not None and self.tokens >= t.max_tokens)

    def emit(self, record: Record) -> None:
        """A record to the sinks, then to every callback's `on_record`."""
        self.log.log(record)
        for callback in self.callbacks:
            callback.on_record(self, record)

    def fit(self) -> dict[str, Any]:
        if self.resumed_from is not None:
            self.log.message(f"resumed from {self.resumed_from} at step {self.step}")
            for note in self.resume_notes:
                self.log.message(note)
        layout = self.backend.layout  # what this process is doing, named in the others' wait errors
        for callback in self.callbacks:
            with layout.phase(f"callback {type(callback).__name__} before training"):
                callback.pre_train(self)
        try:
            with StopRequested() as stop, disk_full_context(self.cfg):
                while not self.done():
                    layout.doing(f"training step {self.step + 1}")
                    result = self.train_step()
                    self.step += 1
                    self.tokens += self.tokens_per_step
                    self._guard(result)
                    for callback in self.callbacks:
                        with layout.phase(f"callback {type(callback).__name__} after step {self.step}"):
                            callback.post_step(self, result)
                    if self._stopping(stop):
                        break
                # Still inside: a second stop signal while the last checkpoint is written (a scheduler
                # that signals the process and its group, `moe-lm launch` passing one on) must not
                # interrupt the save the first one asked for.
                summary: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "finished": self.done()}
                for callback in self.callbacks:
                    with layout.phase(f"callback {type(callback).__name__} at the end"):
                        callback.post_train(self, summary)
        except BaseException as e:
            # The records logged so far reach wandb and TensorBoard before the other processes
            # learn of the failure (from this process's groups closing): they end at once, and the
            # launcher then kills this one. The failure's exit code goes with them (wandb: "failed").
            with contextlib.suppress(Exception):
                self.log.close(exit_code=getattr(e, "exit_code", 1))
            raise
        self.log.close()
        return summary

    def _stopping(self, stop: StopRequested) -> bool:
        """A stop signal, or `train.stop_at_step`: end here (the Checkpoint callback then saves this step)."""
        requested = stop.requested
        if self.backend.layout.world_size > 1:
            # Every process stops at the same step. A signal that reaches them on either side of a
            # step boundary (or one of them only) made one save its checkpoint while the others
            # trained on: each waited on the other until parallel.timeout, and nothing was saved.
            # One number per step; `result.finite` already waits for the step on the host.
            flag = torch.tensor([1.0 if requested else 0.0])
            requested = bool(self.backend.all_reduce(flag, "sum")[0] > 0)
        if requested:
            self.log.message(f"stop requested: saving a checkpoint at step {self.step} and exiting")
            return True
        return bool(self.cfg.train.stop_at_step and self.step >= self.cfg.train.stop_at_step)
