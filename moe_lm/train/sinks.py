"""Where records go: metrics.jsonl in the run directory, wandb, TensorBoard, and the console
(progress bar and messages).

A record is one JSON-able dict with a `kind` ("train", "eval", "sample") and a `step`. The main
process writes every record to each sink, in order; the other processes get a `MetricsLogger` with
no sinks. A new sink is a `Sink` subclass added in `build_logger`.
wandb and TensorBoard never block training: wandb runs offline without an API key (and says at the
end where the run is and how to upload it), and any failure to start or write either turns it off
with one warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_lm import faults
from moe_lm.config import Config
from moe_lm.fsutil import append_bytes, disk_full, is_disk_full


class Sink:
    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    """One line per record; a resumed run appends to the lines of the run it continues.

    Unbuffered: each line reaches the file when it is logged, and a full disk is reported at the
    record that met it (one line: path, bytes needed, bytes free), with nothing left in a buffer
    to fail again at exit. A line cut short by the full disk is dropped on resume (rundir.py)."""

    def __init__(self, path: Path, resumed: bool) -> None:
        self.path = path
        self.file = open(path, "ab" if resumed else "wb", buffering=0)  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode()
        try:
            faults.hit("metrics_write", int(record.get("step", 0)), self.path)
            append_bytes(self.file, line)
        except OSError as e:
            if is_disk_full(e):
                raise disk_full("a metrics record", self.path, len(line), cause=e) from None
            raise

    def close(self) -> None:
        self.file.close()


class ConsoleSink(Sink):
    """Messages for people, and a tqdm bar (when `logging.progress_bar`) that train records move."""

    def __init__(self, cfg: Config, start_step: int) -> None:
        self.bar = None
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=cfg.train.max_steps,
                initial=start_step,
                desc=cfg.name,
                dynamic_ncols=True,
                file=sys.stdout,
                mininterval=1.0,
            )

    def write(self, record: dict[str, Any]) -> None:
        if self.bar is None or record["kind"] != "train":
            return
        self.bar.n = record["step"]
        self.bar.set_postfix(progress_fields(record), refresh=False)
        self.bar.refresh()

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)  # above the bar, which stays at the bottom
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_fields(record: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows of a train record."""
    return {
        "loss": f"{record['loss']:.3f}",
        "aux": f"{record.get('aux_loss', 0):.3f}",
        "lr": f"{record['lr']:.2e}",
        "gnorm": f"{record['grad_norm']:.3g}",
        "tok/s": f"{record['tokens_per_s']:.0f}",
    }


class WandbSink(Sink):
    def __init__(self, cfg: Config, resumed: bool, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.run = self._start(cfg, resumed)

    def _start(self, cfg: Config, resumed: bool) -> Any:
        try:
            import wandb

            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
            mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
            return wandb.init(
                project=cfg.logging.wandb_project,
                entity=cfg.logging.wandb_entity,
                name=cfg.logging.wandb_run_name or cfg.name,
                config=cfg.to_dict(),
                dir=str(cfg.output_dir),
                mode=mode,  # type: ignore[arg-type]
                resume="allow" if resumed else None,
                settings=wandb.Settings(init_timeout=30, silent=True),
            )
        except Exception as e:  # wandb must never stop a training run
            self.warn(f"warning: wandb disabled ({type(e).__name__}: {e})")
            return None

    def write(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        try:
            self.run.log(flatten_scalars(record), step=record["step"])
        except Exception as e:
            self.warn(f"warning: wandb log failed ({e}); continuing without it")
            self.run = None

    def close(self, exit_code: int = 0) -> None:
        """`exit_code`: the run's (0, or its failure's). Given, not left to wandb: a failed run closed
        before its process exits was otherwise recorded with exit code 0 ("finished", not "failed")."""
        if self.run is None:
            return
        offline, where = bool(getattr(self.run, "offline", False)), getattr(self.run, "sync_dir", None)
        with contextlib.suppress(Exception):
            self.run.finish(exit_code=exit_code)
        if offline and where:
            self.warn(f"wandb: the run was logged offline to {where}; upload it with `wandb sync {where}`")


class TensorBoardSink(Sink):
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`): every number of a
    record as a scalar series (the names wandb gets), samples as text."""

    DIR = "tensorboard"

    def __init__(self, cfg: Config, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.writer: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(cfg.output_dir / self.DIR))
        except Exception as e:  # like wandb: a logger never stops a training run
            self.warn(f"warning: TensorBoard disabled ({type(e).__name__}: {e})")

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = record["step"]
        try:
            for key, value in flatten_scalars(record).items():
                if isinstance(value, str):  # a sample's text
                    self.writer.add_text(f"{record['kind']}/{key}", value, step)
                else:
                    self.writer.add_scalar(key, value, step)
        except Exception as e:
            self.warn(f"warning: TensorBoard write failed ({e}); continuing without it")
            self.writer = None

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()


class MetricsLogger:
    """Fans records out to the sinks, in order, and messages out to the console."""

    def __init__(self, sinks: list[Sink], console: ConsoleSink | None = None) -> None:
        self.sinks = sinks
        self.console = console

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def message(self, text: str) -> None:
        if self.console is not None:
            self.console.message(text)

    def close(self, exit_code: int = 0) -> None:
        """`exit_code`: 0, or the failure's when the run failed (only wandb records it: a `Sink`'s
        own `close()` takes nothing, so the ones added by callbacks keep working)."""
        for sink in self.sinks:
            if isinstance(sink, WandbSink):
                sink.close(exit_code)
            else:
                sink.close()


def build_logger(cfg: Config, start_step: int, resumed: bool, is_main: bool) -> MetricsLogger:
    """The main process's sinks from `cfg.logging`; none elsewhere (every process makes the records,
    since they need collectives, but one writes them)."""
    if not is_main:
        return MetricsLogger([])
    # Made in this order so that metrics.jsonl exists before wandb starts, and a wandb warning
    # finds the bar; records reach the console last, after the files.
    jsonl = JsonlSink(cfg.output_dir / "metrics.jsonl", resumed) if cfg.logging.jsonl else None
    console = ConsoleSink(cfg, start_step)
    wandb = WandbSink(cfg, resumed, console.message) if cfg.logging.wandb else None
    tensorboard = TensorBoardSink(cfg, console.message) if cfg.logging.tensorboard else None
    sinks = [s for s in (jsonl, wandb, tensorboard) if s is not None]
    return MetricsLogger([*sinks, console], console)


def flatten_scalars(record: dict[str, Any]) -> dict[str, Any]:
    """Lists of per-layer values become scalar series: expert_load/L0/E3, imbalance/L0, ..."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        if key == "expert_load":
            for layer, row in enumerate(value):
                for expert, frac in enumerate(row):
                    flat[f"expert_load/L{layer}/E{expert}"] = frac
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, int | float):
                    flat[f"{key}/{i}"] = v
        elif isinstance(value, int | float | str):
            prefix = "eval/" if record.get("kind") == "eval" else ""
            flat[prefix + key] = value
    return flat
