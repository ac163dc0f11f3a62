"""The run directory: refuse to clobber another run, resolve a resume, tidy leftovers of a crash.

Two phases, so that bad input never touches a run directory: `prepare_run_dir` only reads and
raises (called first, on every rank); `commit_run_dir` writes (called by the trainer once the
tokenizer, data, model and checkpoint have all loaded).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from moe_lm.config import Config, load_config
from moe_lm.errors import UserError
from moe_lm.state import checkpoint as ckpt
from moe_lm.state.resolve import resolve_resume

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


def prepare_run_dir(cfg: Config, is_main: bool) -> Path | None:
    """Read-only checks, on every rank. -> the checkpoint to resume from, or None for a new run."""
    run_dir = cfg.output_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir {run_dir} is a file; choose a directory")
    resume = None
    if cfg.train.resume:
        resume = resolve_resume(cfg.train.resume, run_dir)
        # The model-shape check again happens on load; here it is cheap and comes before any write.
        ckpt.check_compatible(load_config(resume / "config.yaml"), cfg, resume)
    elif holds_a_run(run_dir) and not cfg.train.overwrite:
        raise UserError(
            f"output directory {run_dir} already holds a run; resume it with train.resume=latest, "
            "choose another train.output_dir, or replace it with train.overwrite=true"
        )
    return resume


def commit_run_dir(cfg: Config, resume: Path | None, is_main: bool) -> None:
    """The writes, on the main process only, once every input has been checked and loaded."""
    if not is_main:
        return
    run_dir = cfg.output_dir
    root = run_dir / "checkpoints"
    if resume is None and cfg.train.overwrite and holds_a_run(run_dir):
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    for leftover in ckpt.clean_temp(root):
        print(f"removed {leftover.name} in {root}: an unfinished checkpoint write or delete", file=sys.stderr)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    if resume is not None:
        step = json.loads((resume / "trainer_state.json").read_text())["step"]
        trim_metrics(run_dir / "metrics.jsonl", step)
        if resume.parent.resolve() == root.resolve():
            # A crash between the rename and the pointer update, or a damaged newest checkpoint,
            # leaves `latest` naming something else; tools (eval, export) read it.
            pointer = root / "latest"
            if not pointer.is_file() or pointer.read_text().strip() != resume.name:
                ckpt.write_pointer(root, resume.name)
            # keep-last-N after a crash that stopped a prune (nothing may be saved before the end).
            ckpt.prune(root, cfg.checkpoint.keep_last, step)


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
