"""Metric records and their sinks: a progress bar, metrics.jsonl in the run directory, and wandb.

Only the main process builds sinks; the others get a `NullLogger`. wandb never blocks training:
without an API key it runs offline, and any failure to start it turns it off with one warning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moe_lm.config import Config

# bf16 dense peak (TFLOP/s) of accelerators we know; MFU is relative to this.
_GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops(cfg: Config, device: torch.device) -> float:
    """One process's FLOP/s that MFU is measured against: configured, a known GPU's bf16 peak, or
    on CPU an estimate (there is no spec sheet to read: the best of several matmul probes)."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return 312e12
    return cpu_matmul_peak()


def cpu_matmul_peak(
    probes: int = 5, size: int = 1024, clock: Callable[[], float] = time.perf_counter
) -> float:
    """FLOP/s of the fastest of `probes` fp32 size x size matmuls. One probe swung 10x with the
    load of the moment; the fastest is the least disturbed. Draws no random numbers (exact resume)."""
    a = torch.full((size, size), 0.5)
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)  # warm-up: first-call allocation and thread start
    best = math.inf
    for _ in range(probes):
        start = clock()
        torch.mm(a, a, out=out)
        best = min(best, clock() - start)
    return 2 * size**3 / max(best, 1e-9)


def mfu(flops_per_step: float, seconds: float, peak_per_process: float, processes: int) -> float:
    """Model FLOPs utilisation: the FLOPs of one step summed over every process, over the peak of
    every process for the step's duration (global over global, so it stays ≤ 1 at any scale)."""
    return flops_per_step / seconds / (peak_per_process * processes)


def router_metrics(counts_LE: torch.Tensor, dropped_L: torch.Tensor, top_k: int) -> dict[str, Any]:
    """Per-layer per-expert load fractions, imbalance (max/mean) and dropped fraction, from global counts."""
    counts_LE = counts_LE.double()
    totals_L = counts_LE.sum(dim=1).clamp_min(1)
    load_LE = counts_LE / totals_L[:, None]
    imbalance_L = counts_LE.max(dim=1).values / (counts_LE.mean(dim=1).clamp_min(1e-9))
    return {
        "expert_load": [[round(float(v), 5) for v in row] for row in load_LE],
        "imbalance": [round(float(v), 4) for v in imbalance_L],
        "dropped_frac": float(dropped_L.double().sum() / totals_L.sum()),
        "dropped_frac_per_layer": [round(float(v), 5) for v in dropped_L.double() / totals_L],
    }


class NullLogger:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLogger(NullLogger):
    def __init__(self, cfg: Config, start_step: int, resumed: bool) -> None:
        self.cfg = cfg
        self.run_dir = cfg.output_dir
        self.jsonl = None
        if cfg.logging.jsonl:
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a" if resumed else "w", buffering=1)  # noqa: SIM115
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
        self.wandb = self._start_wandb(resumed) if cfg.logging.wandb else None

    def _start_wandb(self, resumed: bool) -> Any:
        try:
            import wandb

            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
            mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
            run = wandb.init(
                project=self.cfg.logging.wandb_project,
                entity=self.cfg.logging.wandb_entity,
                name=self.cfg.logging.wandb_run_name or self.cfg.name,
                config=self.cfg.to_dict(),
                dir=str(self.run_dir),
                mode=mode,  # type: ignore[arg-type]
                resume="allow" if resumed else None,
                settings=wandb.Settings(init_timeout=30, silent=True),
            )
            return run
        except Exception as e:  # wandb must never stop a training run
            self.message(f"warning: wandb disabled ({type(e).__name__}: {e})")
            return None

    def log(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log(_flatten_for_wandb(record), step=record["step"])
            except Exception as e:
                self.message(f"warning: wandb log failed ({e}); continuing without it")
                self.wandb = None

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            with contextlib.suppress(Exception):
                self.wandb.finish()


def _flatten_for_wandb(record: dict[str, Any]) -> dict[str, Any]:
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
