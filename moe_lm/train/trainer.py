"""The training loop. It only loops: processes, checkpoints, metrics and data live in their own modules.

One optimizer step = grad_accum_steps micro-batches on every data-parallel rank. The loss of a
micro-batch is lm + aux_coef * mean_layers(aux) + z_coef * mean_layers(z), divided by the number of
micro-batches so gradients are means over the global batch.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from moe_lm import faults
from moe_lm.config import Config
from moe_lm.data.blocks import document_ids
from moe_lm.data.corpus import open_data
from moe_lm.data.loader import ResumableLoader, eval_batches
from moe_lm.data.tokenizer import Tokenizer, check_vocab, ensure_tokenizer
from moe_lm.model import MoETransformer
from moe_lm.model.params import count_params, flops_per_token
from moe_lm.parallel.layout import Layout, start_processes
from moe_lm.parallel.parallelize import build_backend
from moe_lm.state import checkpoint as ckpt
from moe_lm.state.resolve import resolve_resume
from moe_lm.train.metrics import (
    MetricsLogger,
    NullLogger,
    mfu,
    peak_flops,
    router_metrics,
)
from moe_lm.train.optim import apply_freeze, lr_lambda, optimizer_factory, param_groups
from moe_lm.train.preflight import check_memory
from moe_lm.train.rng import TrainingRNG
from moe_lm.train.rundir import commit_run_dir, prepare_run_dir


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
    def __init__(self, cfg: Config, layout: Layout | None = None) -> None:
        """`layout`: the processes this run has joined (`moe-lm train` starts them itself, to end
        them itself); by default the trainer joins them here."""
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
        self.data = open_data(cfg, self.tokenizer, is_main=local_main, barrier=layout.barrier)

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = MoETransformer(cfg.model)
        self.counts = count_params(cfg.model)
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
        self.records: list[dict[str, Any]] = []
        if cfg.train.init_from:
            init = resolve_resume(cfg.train.init_from, cfg.output_dir, key="train.init_from")
            ckpt.load_checkpoint(cfg, b, init, weights_only=True)
        if resumed_from is not None:
            state = ckpt.load_checkpoint(cfg, b, resumed_from)
            self.step = state["trainer"]["step"]
            self.tokens = state["trainer"]["tokens"]
            if "loader" in state["rank"]:
                self.loader.load_state_dict(state["rank"]["loader"])
            # The RNG stream only continues exactly on the same topology; elsewhere it starts from the seed.
            if "rng" in state["rank"] and state["rank"].get("world_size") == b.world_size:
                self.rng.load_state_dict(state["rank"]["rng"])
        commit_run_dir(cfg, resumed_from, b.is_main)  # only now that every input has loaded
        b.barrier()
        self.resumed_from = resumed_from
        self.tokens_per_step = (
            cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps * b.dp_size
        )
        # Both global: every process's tokens, and (in mfu()) every process's peak.
        per_token = flops_per_token(cfg.model, cfg.data.seq_len, self.counts.active_params).train_total
        self.flops_per_step = per_token * self.tokens_per_step
        self.peak = peak_flops(cfg, b.device)
        self.log = MetricsLogger(cfg, self.step, resumed_from is not None) if b.is_main else NullLogger()
        self.nonfinite_in_row = 0
        self.collapse_streak = 0
        self.saved_step = self.step if resumed_from is not None else -1
        self.last_good_checkpoint: Path | None = resumed_from

    # ---- one optimizer step -------------------------------------------------------------------

    def _forward(self, model: Any, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> Any:
        b = self.backend
        if self.cfg.data.document_mask:
            kwargs["document_ids"] = document_ids(input_ids, self.tokenizer.eos_id).to(b.device)
        return model(input_ids.to(b.device), labels=labels.to(b.device), **kwargs)

    def train_step(self) -> dict[str, Any]:
        with self.rng.active():  # only the step draws from the training stream
            return self._train_step()

    def _train_step(self) -> dict[str, Any]:
        b, cfg = self.backend, self.cfg
        b.model.train()
        accum = cfg.train.grad_accum_steps
        sums: dict[str, torch.Tensor] = {}
        counts_LE: torch.Tensor | None = None
        dropped_L: torch.Tensor | None = None
        for micro in range(accum):
            input_ids, labels = self.loader.next_batch()
            with b.accumulate(sync=micro == accum - 1), b.autocast():
                out = self._forward(b.model, input_ids, labels, return_logits=False)
                b.backward(faults.poison(out.loss, self.step + 1) / accum)
            for key in ("loss", "lm_loss", "aux_loss", "hf_aux_loss", "z_loss"):
                value = getattr(out, key)
                if value is not None:
                    sums[key] = sums.get(key, 0) + value.detach().float() / accum
            if out.expert_counts_LE is not None and out.dropped_L is not None:
                counts_LE = out.expert_counts_LE if counts_LE is None else counts_LE + out.expert_counts_LE
                dropped_L = out.dropped_L if dropped_L is None else dropped_L + out.dropped_L
        faults.hit("step", self.step + 1)
        grad_norm, stepped = b.step(cfg.optim.grad_clip)
        if counts_LE is not None and cfg.model.aux_free_bias:
            # Every rank applies the same update from the global load, so biases stay identical.
            b.raw_model.update_expert_bias(b.all_reduce(counts_LE.float(), "sum"))
        return {
            "sums": sums,
            "counts_LE": counts_LE,
            "dropped_L": dropped_L,
            "grad_norm": grad_norm,
            "stepped": stepped,
        }

    def _guard(self, result: dict[str, Any]) -> None:
        """Non-finite loss or gradient: the update was skipped; too many in a row stops the run."""
        loss = result["sums"].get("loss")
        finite = result["stepped"] and (loss is None or bool(torch.isfinite(loss)))
        if finite:
            self.nonfinite_in_row = 0
            return
        self.nonfinite_in_row += 1
        self.log.message(f"warning: step {self.step}: non-finite loss or gradient norm; update skipped")
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
            from moe_lm.errors import UserError

            raise UserError(
                f"training diverged: {self.nonfinite_in_row} non-finite steps in a row ending at step {self.step}; "
                f"last good checkpoint: {self.last_good_checkpoint or 'none'}; lower optim.lr or raise "
                "optim.warmup_steps and resume from it"
            )

    def _record(self, result: dict[str, Any], elapsed: float) -> dict[str, Any]:
        b = self.backend
        sums = {k: float(b.all_reduce(v.reshape(1), "mean")) for k, v in result["sums"].items()}
        record: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens,
            **sums,
            "lr": self.backend.scheduler.get_last_lr()[0],
            "grad_norm": result["grad_norm"],
            "tokens_per_s": self.tokens_per_step / elapsed,
            "mfu": mfu(self.flops_per_step, elapsed, self.peak, b.world_size),
        }
        if result["counts_LE"] is not None:
            counts = b.all_reduce(result["counts_LE"].float(), "sum")
            dropped = b.all_reduce(result["dropped_L"].float(), "sum")
            record.update(router_metrics(counts, dropped, self.cfg.model.top_k))
        record.update(b.extra_metrics())
        for name, samples in self.loader.consumed().items():  # the same on every rank: no collective
            record[f"tokens/{name}"] = samples * self.cfg.data.seq_len
        return record

    def _check_collapse(self, record: dict[str, Any]) -> None:
        worst = max(record.get("imbalance", [0.0]))
        self.collapse_streak = self.collapse_streak + 1 if worst > self.cfg.train.collapse_ratio else 0
        if self.collapse_streak == self.cfg.train.collapse_patience:
            self.log.message(
                f"warning: router collapse? an expert has had > {self.cfg.train.collapse_ratio}x the mean load "
                f"for {self.collapse_streak} logging steps (imbalance {worst:.2f} at step {self.step}); "
                "consider raising model.aux_loss_coef"
            )

    # ---- evaluation, samples, checkpoints -----------------------------------------------------

    @torch.no_grad()
    def _eval_set(self, blocks: Any) -> tuple[float, int]:
        """(mean loss, tokens) of one validation set over every rank."""
        b, cfg = self.backend, self.cfg
        # [sum of token losses, tokens], on the device; float64 so that the sum does not depend on
        # how the blocks are split over ranks. train.eval_batches counts the batches of all ranks.
        total = torch.zeros(2, dtype=torch.float64, device=b.device)
        for input_ids, labels in eval_batches(
            blocks, cfg.train.micro_batch_size, b.dp_rank, b.dp_size, cfg.train.eval_batches
        ):
            with b.autocast():
                out = self._forward(b.raw_model, input_ids, labels)
            assert out.lm_loss is not None
            tokens = int((labels != -100).sum())  # labels are still on the CPU: no device sync
            if tokens:
                total[0] += out.lm_loss.double() * tokens
                total[1] += tokens
        total = b.all_reduce(total, "sum")
        return float(total[0] / total[1]), int(total[1])

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Each validation set as val/<name>/loss and /ppl; val_loss is their mean."""
        assert self.data.val
        model = self.backend.raw_model
        model.eval()
        record: dict[str, Any] = {"kind": "eval", "step": self.step, "tokens": self.tokens}
        losses = []
        for name, blocks in self.data.val.items():
            loss, _ = self._eval_set(blocks)
            losses.append(loss)
            record[f"val/{name}/loss"] = loss
            record[f"val/{name}/ppl"] = math.exp(min(loss, 50.0))
        model.train()
        val_loss = sum(losses) / len(losses)
        return {**record, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    @torch.no_grad()
    def sample(self) -> str:
        cfg, b = self.cfg, self.backend
        prompt = self.tokenizer.encode(cfg.train.sample_prompt) or [self.tokenizer.bos_id]
        # A generator of its own: sampling must not move the training RNG (exact resume).
        gen = torch.Generator(device=b.device).manual_seed(cfg.train.seed + self.step)
        ids = torch.tensor([prompt], device=b.device)
        with b.autocast():
            out = b.raw_model.generate(ids, cfg.train.sample_tokens, temperature=0.8, top_k=50, generator=gen)
        return self.tokenizer.decode(out[0].tolist())

    def save(self) -> Path:
        last = self.records[-1] if self.records else {}
        trainer_state = {
            "step": self.step,
            "tokens": self.tokens,
            "world_size": self.backend.world_size,
            "last_metrics": last,
            "val_loss": getattr(self, "last_val_loss", None),
        }
        rank_state = {
            "loader": self.loader.state_dict(),
            "rng": self.rng.state_dict(),
            "world_size": self.backend.world_size,
        }
        path = ckpt.save_checkpoint(self.cfg, self.backend, self.step, rank_state, trainer_state)
        self.saved_step = self.step
        if self.nonfinite_in_row == 0:
            self.last_good_checkpoint = path
        self.log.message(f"saved checkpoint {path}")
        return path

    # ---- the loop -----------------------------------------------------------------------------

    def _done(self) -> bool:
        t = self.cfg.train
        return self.step >= t.max_steps or (t.max_tokens is not None and self.tokens >= t.max_tokens)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.resumed_from is not None:
            self.log.message(f"resumed from {self.resumed_from} at step {self.step}")
        if self.step == 0 and cfg.train.eval_every:
            self._eval_and_log()  # the starting point, so the log shows how far validation loss fell
        with StopRequested() as stop:
            while not self._done():
                start = time.perf_counter()
                result = self.train_step()
                self.step += 1
                self.tokens += self.tokens_per_step
                self._guard(result)
                if self.step % cfg.logging.log_every == 0 or self.step == 1:
                    record = self._record(result, time.perf_counter() - start)
                    self.records.append(record)
                    faults.torn_write(cfg.output_dir / "metrics.jsonl", record, self.step)
                    self.log.log(record)
                    self._check_collapse(record)
                    self.log.progress(
                        self.step,
                        {
                            "loss": f"{record['loss']:.3f}",
                            "aux": f"{record.get('aux_loss', 0):.3f}",
                            "tok/s": f"{record['tokens_per_s']:.0f}",
                        },
                    )
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and not self._done():
                    self._eval_and_log()
                if cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                    self._sample_and_log()
                # Not while steps are being skipped (that state is suspect), and not at the end:
                # the final checkpoint is written after the final eval so it carries its val loss.
                periodic = cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0
                if periodic and self.nonfinite_in_row == 0 and not self._done():
                    self.save()
                if stop.requested or (cfg.train.stop_at_step and self.step >= cfg.train.stop_at_step):
                    if stop.requested:
                        self.log.message(
                            f"stop requested: saving a checkpoint at step {self.step} and exiting"
                        )
                    break
        finished = self._done()
        summary: dict[str, Any] = {"step": self.step, "tokens": self.tokens}
        if finished:
            summary.update(self._eval_and_log())
            summary["sample"] = self._sample_and_log()
        final = self.save() if self.saved_step != self.step else None
        summary["checkpoint"] = str(final or self.last_good_checkpoint)
        summary["finished"] = finished
        summary["final_checkpoint"] = final  # written at the end of this invocation (None: saved before)
        self.log.close()
        return summary

    def _eval_and_log(self) -> dict[str, Any]:
        if not self.data.val:  # no validation set configured
            return {}
        record = self.evaluate()
        self.last_val_loss = record["val_loss"]
        self.log.log(record)
        per_set = ""
        if len(self.data.val) > 1:
            per_set = "  (" + ", ".join(f"{n} {record[f'val/{n}/loss']:.4f}" for n in self.data.val) + ")"
        self.log.message(
            f"step {self.step}: val_loss {record['val_loss']:.4f}  val_ppl {record['val_ppl']:.2f}{per_set}"
        )
        return record

    def _sample_and_log(self) -> str:
        text = self.sample()
        self.log.log({"kind": "sample", "step": self.step, "tokens": self.tokens, "text": text})
        self.log.message(f"--- sample at step {self.step} ---\n{text}\n---")
        return text
