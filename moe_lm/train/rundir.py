"""The run directory: refuse to clobber another run, resolve a resume, tidy leftovers of a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moe_lm.config import Config
from moe_lm.errors import UserError
from moe_lm.train import checkpoint as ckpt


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints"))


def prepare_run_dir(cfg: Config, is_main: bool) -> Path | None:
    """Every rank calls this (the checks read only); the main process writes. -> checkpoint to resume."""
    run_dir = cfg.output_dir
    resume = None
    if cfg.train.resume:
        resume = ckpt.resolve_resume(cfg.train.resume, run_dir)
    elif holds_a_run(run_dir) and not cfg.train.overwrite:
        raise UserError(
            f"output directory {run_dir} already holds a run; resume it with train.resume=latest, "
            "choose another train.output_dir, or replace it with train.overwrite=true"
        )
    if not is_main:
        return resume
    if resume is None and cfg.train.overwrite and holds_a_run(run_dir):
        for name in ("checkpoints", "metrics.jsonl", "config.yaml"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.clean_temp(run_dir / "checkpoints")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if resume is not None:
        step = json.loads((resume / "trainer_state.json").read_text())["step"]
        trim_metrics(run_dir / "metrics.jsonl", step)
    return resume


def trim_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint we resume from: they will be logged again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
