"""The training loop. It only loops: it steps, counts, guards against non-finite steps and stops;
logging, evaluation, samples and checkpoints are callbacks (`moe_lm/train/callbacks.py`) it calls
at fixed points, and processes, checkpoint format, metrics and data live in their own modules.

One optimizer step = grad_accum_steps micro-batches on every data-parallel rank. The loss of a
micro-batch is lm + aux_coef * mean_layers(aux) + z_coef * mean_layers(z), divided by the number of
micro-batches so gradients are means over the global batch.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from moe_lm import faults
from moe_lm.config import Config
from moe_lm.data.blocks import batch_document_ids
from moe_lm.data.chat import chat_encoder
from moe_lm.data.corpus import open_data
from moe_lm.data.loader import ResumableLoader
from moe_lm.data.tokenizer import Tokenizer, check_vocab, ensure_tokenizer
from moe_lm.errors import UserError
from moe_lm.fsutil import DiskFullError
from moe_lm.model import MoETransformer
from moe_lm.model.balance import global_batch_step
from moe_lm.parallel.layout import Layout, start_processes
from moe_lm.parallel.parallelize import build_backend
from moe_lm.state import checkpoint as ckpt
from moe_lm.state.resolve import resolve_resume
from moe_lm.state.write_errors import explain_disk_full
from moe_lm.train.callbacks import Callback, Record, default_callbacks
from moe_lm.train.optim import apply_freeze, lr_lambda, optimizer_factory, param_groups
from moe_lm.train.preflight import check_memory
from moe_lm.train.rng import TrainingRNG
from moe_lm.train.rundir import commit_run_dir, prepare_run_dir
from moe_lm.train.sinks import build_logger


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured on this process, before any reduction over processes."""

    # loss, lm_loss, aux_loss, hf_aux_loss, z_loss (those the model returned): 0-dim float32
    # tensors on the device, means over the step's micro-batches.
    losses: dict[str, torch.Tensor]
    expert_counts_LE: torch.Tensor | None  # tokens each MoE layer routed to each expert (None: no MoE layer)
    dropped_L: torch.Tensor | None  # per MoE layer, tokens dropped by the capacity limit
    grad_norm: float  # global, before clipping
    stepped: bool  # False: the norm was not finite and the update was skipped
    seconds: float  # wall-clock time of the step
    router_entropy_L: torch.Tensor | None = (
        None  # per MoE layer, mean router entropy (nats) over the micro-batches
    )
    target_tokens: torch.Tensor | None = None  # packed conversations: the step's targets, every process

    @property
    def finite(self) -> bool:
        loss = self.losses.get("loss")
        return self.stepped and (loss is None or bool(torch.isfinite(loss)))


@contextmanager
def disk_full_context(cfg: Config) -> Iterator[None]:
    """A full disk met by the token store or metrics.jsonl: say which checkpoint survives and how
    to continue (a checkpoint write's own error says so already)."""
    try:
        yield
    except DiskFullError as e:
        raise explain_disk_full(e, cfg.output_dir / "checkpoints") from None


class StopRequested:
    """SIGTERM / SIGINT (preemption, Ctrl-C) asks for a checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
        if layout.is_main:
            check_memory(cfg, layout.world_size, layout.device)
        layout.barrier()

        if layout.is_main:
            ensure_tokenizer(cfg)
        layout.barrier()
        self.tokenizer = Tokenizer.load(cfg.data.tokenizer)
        check_vocab(self.tokenizer, cfg.model.vocab_size)
        # The first run prepares the token store: one process per node (nodes may not share
        # data.cache_dir; where they do, the store's lock lets one tokenise and the other find it
        # done). Every process then reads its blocks by memory map.
        local_main = bool(layout.accelerator.is_local_main_process)
        with disk_full_context(cfg):
            self.data = open_data(cfg, self.tokenizer, is_main=local_main, barrier=layout.barrier)
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
        b.barrier()
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
        b = self.backend
        pair: Sequence[torch.Tensor] = batch if labels is None else (batch, labels)  # type: ignore[assignment]
        input_ids, labels = pair[0], pair[1]
        docs = self.document_ids(pair)
        if docs is not None:
            kwargs["document_ids"] = docs.to(b.device)
        return model(input_ids.to(b.device), labels=labels.to(b.device), **kwargs)

    def _count(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """Expert counts [L, E] of one micro-batch, without autograd or LM head (the counting pass
        of model.aux_loss_scope global_batch, moe_lm/model/balance.py)."""
        b, input_ids = self.backend, batch[0]
        docs = self.document_ids(batch)
        with b.autocast():
            return b.raw_model.route_counts(
                input_ids.to(b.device), document_ids=None if docs is None else docs.to(b.device)
            )

    def _lm_weights(self, batches: list[Any]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Packed conversations: per micro-batch, the factor n_m * W / N on its lm_loss (its mean over
        its n_m targets), N the targets of the whole step (every micro-batch of all W processes, one
        all-reduce). The step's LM loss and gradient are then the mean over every target token, as
        one process running the global batch at once computes them; a mean of micro-batch means
        would weigh a token of a micro-batch with few assistant tokens above the others. Counted
        from the labels on the CPU: no device sync. -> (factors, N as a 0-dim device tensor)."""
        b = self.backend
        counts = [float((labels != -100).sum()) for _, labels in batches]
        total = b.all_reduce(torch.tensor([sum(counts)], device=b.device), "sum")[0]
        return [c * b.world_size / total.clamp_min(1) for c in counts], total

    def train_step(self) -> StepResult:
        start = time.perf_counter()
        with self.rng.active():  # only the step draws from the training stream
            return self._train_step(start)

    def _train_step(self, start: float) -> StepResult:
        b, cfg = self.backend, self.cfg
        b.model.train()
        accum = cfg.train.grad_accum_steps
        losses: dict[str, torch.Tensor] = {}
        counts_LE: torch.Tensor | None = None
        dropped_L: torch.Tensor | None = None
        entropy_L: torch.Tensor | None = None
        # All of the step's micro-batches first: global-batch balancing may count them before any runs.
        batches = [self.loader.next_batch() for _ in range(accum)]
        weights, targets = self._lm_weights(batches) if self.data.packed else (None, None)
        with global_batch_step(b.raw_model, batches, self._count):
            for micro, batch in enumerate(batches):
                with b.accumulate(sync=micro == accum - 1), b.autocast():
                    out = self.forward(b.model, batch, return_logits=False)
                    weighted: dict[str, torch.Tensor] = {}
                    if weights is not None:  # token-weighted LM term; the router terms stay means
                        lm = out.lm_loss * weights[micro]
                        weighted = {"loss": (out.loss - out.lm_loss) / accum + lm, "lm_loss": lm}
                        b.backward(faults.poison(weighted["loss"], self.step + 1))
                    else:
                        b.backward(faults.poison(out.loss, self.step + 1) / accum)
                for key in ("loss", "lm_loss", "aux_loss", "hf_aux_loss", "z_loss"):
                    value = getattr(out, key)
                    if value is not None:
                        value = weighted[key] if key in weighted else value.detach().float() / accum
                        losses[key] = losses.get(key, 0) + value.detach().float()
                if out.expert_counts_LE is not None and out.dropped_L is not None:
                    counts_LE = (
                        out.expert_counts_LE if counts_LE is None else counts_LE + out.expert_counts_LE
                    )
                    dropped_L = out.dropped_L if dropped_L is None else dropped_L + out.dropped_L
                if out.router_entropy_L is not None:
                    entropy = out.router_entropy_L / accum
                    entropy_L = entropy if entropy_L is None else entropy_L + entropy
        faults.hit("step", self.step + 1)
        grad_norm, stepped = b.step(cfg.optim.grad_clip)
        if counts_LE is not None and cfg.model.aux_free_bias:
            # Every rank applies the same update from the global load, so biases stay identical.
            b.raw_model.update_expert_bias(b.all_reduce(counts_LE.float(), "sum"))
        seconds = time.perf_counter() - start
        return StepResult(losses, counts_LE, dropped_L, grad_norm, stepped, seconds, entropy_L, targets)

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
        for callback in self.callbacks:
            callback.pre_train(self)
        with StopRequested() as stop, disk_full_context(self.cfg):
            while not self.done():
                result = self.train_step()
                self.step += 1
                self.tokens += self.tokens_per_step
                self._guard(result)
                for callback in self.callbacks:
                    callback.post_step(self, result)
                if self._stopping(stop):
                    break
        summary: dict[str, Any] = {"step": self.step, "tokens": self.tokens, "finished": self.done()}
        for callback in self.callbacks:
            callback.post_train(self, summary)
        self.log.close()
        return summary

    def _stopping(self, stop: StopRequested) -> bool:
        """A stop signal, or `train.stop_at_step`: end here (the Checkpoint callback then saves this step)."""
        if stop.requested:
            self.log.message(f"stop requested: saving a checkpoint at step {self.step} and exiting")
            return True
        return bool(self.cfg.train.stop_at_step and self.step >= self.cfg.train.stop_at_step)
