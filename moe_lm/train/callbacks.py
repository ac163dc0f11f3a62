"""What the training loop calls at its fixed points: logging, collapse detection, evaluation, samples
and checkpoints. The loop (`Trainer.fit`) steps, counts and stops; everything else is here.

The points, in the order of a run:

  pre_train(trainer)            once, before the first step of this invocation (a resume has loaded)
  post_step(trainer, result)    after every optimizer step; `trainer.step` and `trainer.tokens`
                                already count it, and a non-finite step has been counted
  on_record(trainer, record)    each record a callback emits with `trainer.emit` (train, eval,
                                sample), after the sinks have written it
  post_train(trainer, summary)  once, after the last step or a stop; `summary` is what `fit` returns,
                                with "step", "tokens" and "finished" in it

At every point the callbacks run in list order (`default_callbacks`), and that order is the order
of the side effects: the train record, then evaluation, a sample, a checkpoint. Every process runs
every callback (records and evaluation reduce over processes); `trainer.log` writes only on the main one.

To add one: subclass `Callback`, override the points you need, and pass
`Trainer(cfg, callbacks=[*default_callbacks(cfg), Mine()])`. To add a metric to the train or eval
record, give `LogMetrics` or `Evaluate` an `extra` function; to send records somewhere new, add a
sink (`moe_lm/train/sinks.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_lm import faults
from moe_lm.config import Config
from moe_lm.model.params import count_params, flops_per_token
from moe_lm.state import checkpoint as ckpt
from moe_lm.train.evaluation import evaluate, load_summary, loss_on, sample
from moe_lm.train.metrics import mfu, peak_flops, router_metrics
from moe_lm.train.routing_health import eval_repetition, router_entropy

if TYPE_CHECKING:
    from moe_lm.train.trainer import StepResult, Trainer

Record = dict[str, Any]
# Entered around the evaluation passes; gives a function that, called after them, returns entries
# for the eval record (every process calls it, so it may use collectives).
EvalProbe = Callable[["Trainer"], AbstractContextManager[Callable[[], Record]]]


class Callback:
    """A hook into the loop; every point does nothing unless overridden."""

    def pre_train(self, trainer: Trainer) -> None:
        pass

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_record(self, trainer: Trainer, record: Record) -> None:
        pass

    def post_train(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        pass


def default_callbacks(cfg: Config) -> list[Callback]:
    """Every run's callbacks, in the order they run at each point."""
    t = cfg.train
    return [
        LogMetrics(cfg.logging.log_every, extra=[router_entropy]),
        CollapseWarning(t.collapse_ratio, t.collapse_patience),
        Evaluate(t.eval_every, probes=[eval_repetition]),
        Sample(t.sample_every),
        Checkpoint(cfg.checkpoint.every),
    ]


def _due(every: int, step: int) -> bool:
    return bool(every) and step % every == 0


class LogMetrics(Callback):
    """The train record, every `logging.log_every` steps and at step 1: the step's losses (mean over
    processes), lr, grad norm, tokens/s, MFU, router load, expert-parallel traffic, tokens per source.

    `extra`: functions of (trainer, result) whose dicts are added to the record. They run on every
    process, so they may use collectives (`trainer.backend.all_reduce`)."""

    def __init__(self, every: int, extra: Sequence[Callable[[Trainer, StepResult], Record]] = ()) -> None:
        self.every = every
        self.extra = list(extra)
        self.flops_per_step = 0.0
        self.peak = 0.0

    def pre_train(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        active = count_params(cfg.model).active_params
        # Both global: every process's tokens, and (in mfu()) every process's peak.
        per_token = flops_per_token(cfg.model, cfg.data.seq_len, active).train_total
        self.flops_per_step = per_token * trainer.tokens_per_step
        self.peak = peak_flops(cfg, trainer.backend.device)

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        if not (_due(self.every, trainer.step) or trainer.step == 1):
            return
        record = self.record(trainer, result)
        faults.torn_write(trainer.cfg.output_dir / "metrics.jsonl", record, trainer.step)
        trainer.emit(record)

    def record(self, trainer: Trainer, result: StepResult) -> Record:
        b, cfg = trainer.backend, trainer.cfg
        losses = {k: float(b.all_reduce(v.reshape(1), "mean")) for k, v in result.losses.items()}
        record: Record = {
            "kind": "train",
            "step": trainer.step,
            "tokens": trainer.tokens,
            **losses,
            "lr": b.scheduler.get_last_lr()[0],
            "grad_norm": result.grad_norm,
            "tokens_per_s": trainer.tokens_per_step / result.seconds,
            "mfu": mfu(self.flops_per_step, result.seconds, self.peak, b.world_size),
        }
        if result.expert_counts_LE is not None and result.dropped_L is not None:
            counts = b.all_reduce(result.expert_counts_LE.float(), "sum")
            dropped = b.all_reduce(result.dropped_L.float(), "sum")
            record.update(router_metrics(counts, dropped, cfg.model.top_k))
        if result.target_tokens is not None:  # packed conversations: lm_loss is over these tokens only
            record.update(loss_on=loss_on(cfg), target_tokens=int(result.target_tokens))
        record.update(b.extra_metrics())
        for name, samples in trainer.loader.consumed().items():  # the same on every rank: no collective
            record[f"tokens/{name}"] = samples * cfg.data.seq_len
        for extra in self.extra:
            record.update(extra(trainer, result))
        return record


class CollapseWarning(Callback):
    """Warns once a streak of train records has reached `patience` with an expert above `ratio` x
    the mean load (router collapse: the aux loss is too weak to spread the tokens)."""

    def __init__(self, ratio: float, patience: int) -> None:
        self.ratio, self.patience = ratio, patience
        self.streak = 0

    def on_record(self, trainer: Trainer, record: Record) -> None:
        if record["kind"] != "train":
            return
        worst = max(record.get("imbalance", [0.0]))
        self.streak = self.streak + 1 if worst > self.ratio else 0
        if self.streak == self.patience:
            trainer.log.message(
                f"warning: router collapse? an expert has had > {self.ratio}x the mean load "
                f"for {self.streak} logging steps (imbalance {worst:.2f} at step {trainer.step}); "
                "consider raising model.aux_loss_coef"
            )


class Evaluate(Callback):
    """Validation loss at step 0 (so the log shows how far it fell), every `every` steps, and after
    the last step. That one runs in post_train, before the final checkpoint, which then carries it.

    `extra`: functions of the trainer whose dicts are added to the eval record (every process runs
    them, so they may use collectives); `probes` (EvalProbe) measure during the evaluation passes
    themselves, e.g. the routing (moe_lm/train/routing_health.py); `post_train` returns the record
    into fit's summary."""

    def __init__(
        self,
        every: int,
        extra: Sequence[Callable[[Trainer], Record]] = (),
        probes: Sequence[EvalProbe] = (),
    ) -> None:
        self.every = every
        self.extra = list(extra)
        self.probes = list(probes)

    def pre_train(self, trainer: Trainer) -> None:
        if trainer.step == 0 and self.every:
            self.run(trainer)

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        if _due(self.every, trainer.step) and not trainer.done():
            self.run(trainer)

    def post_train(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if summary["finished"]:
            summary.update(self.run(trainer))

    def run(self, trainer: Trainer) -> Record:
        sets = trainer.data.val
        if not sets:  # no validation set configured
            return {}
        with ExitStack() as stack:
            reads = [stack.enter_context(probe(trainer)) for probe in self.probes]
            record = evaluate(trainer)
        for read in reads:
            record.update(read())
        for extra in self.extra:
            record.update(extra(trainer))
        trainer.emit(record)
        per_set = ""
        if len(sets) > 1:
            per_set = "  (" + ", ".join(f"{n} {record[f'val/{n}/loss']:.4f}" for n in sets) + ")"
        over = f" (over {record['loss_on']} tokens)" if "loss_on" in record else ""
        trainer.log.message(
            f"step {trainer.step}: val_loss {record['val_loss']:.4f}  val_ppl {record['val_ppl']:.2f}{per_set}{over}"
        )
        if record.get("val_imbalance"):
            trainer.log.message(f"step {trainer.step}: {load_summary(record['val_imbalance'])}")
        return record


class Sample(Callback):
    """A sample every `every` steps, and after the last step (into fit's summary)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        if _due(self.every, trainer.step):
            self.run(trainer)

    def post_train(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if summary["finished"]:
            summary["sample"] = self.run(trainer)

    def run(self, trainer: Trainer) -> str:
        text = sample(trainer)
        trainer.emit({"kind": "sample", "step": trainer.step, "tokens": trainer.tokens, "text": text})
        trainer.log.message(f"--- sample at step {trainer.step} ---\n{text}\n---")
        return text


class Checkpoint(Callback):
    """A checkpoint every `every` steps, and one at the end of the invocation unless that step was
    just saved. None while steps are being skipped for non-finite values (that state is suspect, and
    "last good checkpoint" must mean it), and no periodic one at the last step: the final one is
    written after the final evaluation, so it carries its val loss. `Trainer.__init__` reads back
    what `save` writes."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.saved_step = -1
        self.last_metrics: Record = {}  # the newest train record, kept in the checkpoint
        self.val_loss: float | None = None

    def pre_train(self, trainer: Trainer) -> None:
        if trainer.resumed_from is not None:  # this step is on disk already
            self.saved_step = trainer.step

    def on_record(self, trainer: Trainer, record: Record) -> None:
        if record["kind"] == "train":
            self.last_metrics = record
        elif record["kind"] == "eval":
            self.val_loss = record["val_loss"]

    def post_step(self, trainer: Trainer, result: StepResult) -> None:
        if _due(self.every, trainer.step) and trainer.nonfinite_in_row == 0 and not trainer.done():
            self.save(trainer)

    def post_train(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        final = self.save(trainer) if self.saved_step != trainer.step else None
        summary["checkpoint"] = str(final or trainer.last_good_checkpoint)
        summary["final_checkpoint"] = final  # written at the end of this invocation (None: saved before)

    def save(self, trainer: Trainer) -> Path:
        b = trainer.backend
        trainer_state = {
            "step": trainer.step,
            "tokens": trainer.tokens,
            "world_size": b.world_size,
            "last_metrics": self.last_metrics,
            "val_loss": self.val_loss,
        }
        # The data position is global: the main process writes it for every rank.
        position = trainer.loader.state_dict() if b.is_main else None
        rng = trainer.rng.state_dict()
        path = ckpt.save_checkpoint(trainer.cfg, b, trainer.step, rng, position, trainer_state)
        self.saved_step = trainer.step
        if trainer.nonfinite_in_row == 0:
            trainer.last_good_checkpoint = path
        trainer.log.message(f"saved checkpoint {path}")
        return path
