"""The run directory: refuse to clobber another run, resolve a resume, tidy leftovers of a crash.

Two phases, so that bad input never touches a run directory: `prepare_run_dir` only reads and
raises (called first, on every rank); `commit_run_dir` writes (called by the trainer once the
tokenizer, data, model and checkpoint have all loaded).

`train.resume=auto` is the one command line for a first start and every requeue of a preemptible
job: the newest complete checkpoint if there is one, else a fresh start (replacing what a run
killed before its first checkpoint left). Resuming with another `train.max_steps`: a larger one
extends the run, a smaller one that is still ahead of the checkpoint shortens it (both re-fit the
learning-rate schedule, with a warning when the lr jumps); one at or below the checkpoint's step
trains nothing and is refused, except that a run already finished simply reports so (`RunFinished`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

from moe_lm.config import Config, load_config
from moe_lm.errors import UserError
from moe_lm.state import checkpoint as ckpt
from moe_lm.state.resolve import resolve_resume, step_dirs
from moe_lm.state.run_state import load_trainer_state
from moe_lm.train.optim import lr_lambda

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


class RunFinished(Exception):
    """The checkpoint to resume already reached the end of training: nothing to do (exit 0)."""


def prepare_run_dir(cfg: Config, is_main: bool) -> Path | None:
    """Read-only checks, on every rank. -> the checkpoint to resume from, or None for a new run."""
    run_dir = cfg.output_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.output_dir {run_dir} is a file; choose a directory")
    check_writable(run_dir)
    resume = None
    spec = cfg.train.resume
    if spec == "auto" and not step_dirs(run_dir / "checkpoints"):
        if is_main:
            left = " (replacing what an earlier start left there)" if holds_a_run(run_dir) else ""
            print(f"train.resume=auto: no checkpoint in {run_dir} yet; starting a new run{left}", flush=True)
    elif spec:
        resume = resolve_resume(spec, run_dir)
        # The model-shape check again happens on load; here it is cheap and comes before any write.
        old = load_config(resume / "config.yaml")
        ckpt.check_compatible(old, cfg, resume)
        check_steps(old, cfg, resume, is_main)
    elif holds_a_run(run_dir) and not cfg.train.overwrite:
        raise UserError(
            f"output directory {run_dir} already holds a run; resume it with train.resume=latest "
            "(or auto), choose another train.output_dir, or replace it with train.overwrite=true"
        )
    return resume


def check_writable(run_dir: Path) -> None:
    """Before anything loads or trains: the run directory can be made and written (a read-only
    mount or a file in the way would otherwise end the run with a traceback at its first write)."""
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"train.output_dir {run_dir} cannot be made: {existing} is a file; choose another train.output_dir"
        )
    for d in (existing, run_dir / "checkpoints"):
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            raise UserError(
                f"train.output_dir {run_dir} is not writable ({d}: permission denied or a read-only filesystem); "
                "choose another train.output_dir or make it writable"
            )


def check_steps(old: Config, cfg: Config, resume: Path, is_main: bool) -> None:
    """What resuming the checkpoint at step N means under this config's train.max_steps / max_tokens."""
    state = load_trainer_state(resume)
    step, tokens = state["step"], state["tokens"]
    t = cfg.train
    if step > t.max_steps:
        raise UserError(
            f"train.max_steps = {t.max_steps} is below the step of checkpoint {resume} ({step}); a run cannot "
            f"be shortened past its checkpoint: raise train.max_steps above {step} to continue, or use the "
            "checkpoint as it is (moe-lm eval / export)"
        )
    if step == t.max_steps or (t.max_tokens is not None and tokens >= t.max_tokens):
        raise RunFinished(
            f"{cfg.output_dir}: training already finished at step {step} ({resume}); nothing to do "
            f"(raise train.max_steps to train further)"
        )
    before = cfg.optim.lr * lr_lambda(old.optim, old.train)(step)
    after = cfg.optim.lr * lr_lambda(cfg.optim, t)(step)
    if is_main and old.train.max_steps != t.max_steps and not math.isclose(before, after, rel_tol=0.01):
        verb = "extends" if t.max_steps > old.train.max_steps else "shortens"
        print(
            f"warning: train.max_steps {old.train.max_steps} -> {t.max_steps} {verb} the run and its "
            f"learning-rate schedule: at step {step} the lr moves from {before:.3g} to {after:.3g}",
            file=sys.stderr,
            flush=True,
        )


def commit_run_dir(cfg: Config, resume: Path | None, is_main: bool) -> None:
    """The writes, on the main process only, once every input has been checked and loaded."""
    if not is_main:
        return
    try:
        _commit(cfg, resume)
    except OSError as e:  # what check_writable cannot see (root on a read-only path, a race)
        raise UserError(
            f"cannot write train.output_dir {cfg.output_dir} ({e.filename or cfg.output_dir}: {e.strerror or e}); "
            "choose another train.output_dir or make it writable"
        ) from None


def _commit(cfg: Config, resume: Path | None) -> None:
    run_dir = cfg.output_dir
    root = run_dir / "checkpoints"
    replace = cfg.train.overwrite or cfg.train.resume == "auto"  # auto: a start that saved nothing
    if resume is None and replace and holds_a_run(run_dir):
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
        step = load_trainer_state(resume)["step"]
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
