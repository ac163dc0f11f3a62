"""Checkpoints: one directory per step, written under a temp name and renamed (atomic), with a manifest.

Layout of `RUN/checkpoints/step-N/`:
  config.yaml                       the resolved run config
  model-ep{r}-of-{n}.safetensors    weights, experts keyed by global index (see weights.py)
  optim-ep{r}-of-{n}.safetensors    optimizer + scheduler state of the parameters that file's rank held
  data_position.json                the global data position: samples consumed per source, epoch,
                                    seed, stream positions (run_state.py); any world size resumes it
  rng-rank{r}.safetensors           rank r's training RNG state
  trainer_state.json                step, tokens, last metrics
  MANIFEST.json                     size and sha256 of every file above; written last
Nothing is pickled: loading a checkpoint never runs code, whoever wrote the files. Checkpoints of
earlier versions (`optim-*.pt`, `rank{r}.pt`) still load, through a restricted unpickler (legacy.py).
`RUN/checkpoints/latest` names the newest complete checkpoint (for tools; resuming scans the
directories). A directory without a valid manifest (manifest.py) is never picked: the resolver
(resolve.py) falls back to the previous complete one and says so. Anything named `.tmp-*` is an
unfinished write or delete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from moe_lm import faults
from moe_lm.config import Config, load_config
from moe_lm.errors import UserError
from moe_lm.fsutil import free_bytes, human_bytes, is_disk_full
from moe_lm.model.params import count_params
from moe_lm.state.manifest import MANIFEST, write_manifest
from moe_lm.state.resolve import step_dirs
from moe_lm.state.run_state import RunState, load_run_state, save_data_position, save_rng
from moe_lm.state.weights import check_state, save_weights
from moe_lm.state.write_errors import CONTINUE, any_failed, checkpoint_bytes, raise_for_failure

TMP_PREFIX = ".tmp-"


class StateBackend(Protocol):
    rank: int
    world_size: int
    is_main: bool

    def save_state(self, directory: Path) -> None: ...
    def load_state(self, directory: Path, weights_only: bool = False) -> None: ...
    def barrier(self) -> None: ...
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_temp(ckpt_root: Path) -> list[Path]:
    """Leftovers of a write or a prune that was killed: never complete, safe to delete. -> what went."""
    removed = []
    if ckpt_root.is_dir():
        for tmp in sorted(ckpt_root.glob(TMP_PREFIX + "*")):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_pointer(ckpt_root: Path, name: str, step: int = -1) -> None:
    """`latest` names a checkpoint for tools (eval, export); written atomically via a temp file."""
    pointer = ckpt_root / f"{TMP_PREFIX}latest"
    faults.hit("ckpt_latest", step, pointer)
    pointer.write_text(name)
    os.replace(pointer, ckpt_root / "latest")


def _discard(path: Path, fault_step: int = -1) -> None:
    """Delete a checkpoint directory so that a kill midway leaves only a temp dir (cleaned on start),
    never a half-deleted `step-N` that looks like a checkpoint."""
    trash = path.parent / f"{TMP_PREFIX}del-{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    faults.hit("prune", fault_step)
    shutil.rmtree(trash, ignore_errors=True)


def prune(ckpt_root: Path, keep_last: int, current: int) -> None:
    """Keep the `keep_last` newest complete checkpoints up to step `current`; delete older ones.

    Newer ones (a run resumed from an earlier checkpoint) are left alone: they are replaced when
    the run reaches their step again, and are not ours to delete before that.
    """
    if keep_last <= 0:
        return
    mine = [d for d in step_dirs(ckpt_root) if int(d.name[5:]) <= current]
    complete = [d for d in mine if (d / MANIFEST).is_file()]
    if len(complete) < keep_last:  # too few good ones: keep even the damaged, just in case
        return
    cutoff = int(complete[keep_last - 1].name[5:])
    for old in mine:
        if int(old.name[5:]) < cutoff:
            _discard(old, fault_step=current)


def save_checkpoint(
    cfg: Config,
    backend: StateBackend,
    step: int,
    rng: dict[str, torch.Tensor],
    data_position: dict[str, Any] | None,
    trainer_state: dict[str, Any],
) -> Path:
    """Every rank calls this with its own RNG state; `data_position` (global) is written by the main
    process. Returns the final directory. keep-last-N pruning happens here too.

    Until the rename, everything lives in a temp dir: a kill leaves it behind (cleaned on the next
    start), a write error removes it and raises one line on every rank; earlier checkpoints are
    never touched.
    """
    root = cfg.output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f"{TMP_PREFIX}step-{step}"

    def phase(work: Any) -> None:
        """Run one rank's share of a phase; every rank learns whether any rank failed, and why, so a
        full disk on one rank neither leaves the others waiting at a barrier nor hides behind them."""
        error: BaseException | None = None
        try:
            work()
        except Exception as e:
            error = e
        if not any_failed(backend, error):
            return
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        backend.barrier()  # the temp dir is gone before anyone measures the free space
        size = checkpoint_bytes(root, count_params(cfg.model).total_params)
        raise_for_failure(backend, error, final.name, root, size)

    def make_dir() -> None:
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def own_files() -> None:
        backend.save_state(tmp)
        save_rng(tmp, backend.rank, backend.world_size, rng)
        faults.hit("ckpt_files", step, tmp)

    def seal() -> None:
        if backend.is_main:
            (tmp / "config.yaml").write_text(cfg.to_yaml())
            if data_position is not None:
                save_data_position(tmp, data_position)
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            write_manifest(tmp)
            faults.hit("ckpt_manifest", step)
            if final.exists():  # a re-run of the same step (e.g. after a crash right after the rename)
                _discard(final)
            os.replace(tmp, final)
            _fsync_dir(root)

    # A phase of its own: every rank learns whether the directory exists (the phase's all-reduce is
    # the barrier) before writing into it, and a main process that cannot make it (read-only, a file
    # in the way) stops every rank with its line instead of leaving them at a barrier.
    phase(make_dir)
    phase(own_files)
    phase(seal)

    def finish() -> None:
        if backend.is_main:
            faults.hit("ckpt_renamed", step)
            try:
                write_pointer(root, final.name, step)
            except OSError as e:  # the checkpoint is complete: say so, not "nothing was kept"
                (root / f"{TMP_PREFIX}latest").unlink(missing_ok=True)
                what = f"disk full: cannot write `latest` in {root} ({human_bytes(free_bytes(root))} free)"
                if not is_disk_full(e):
                    what = f"cannot write `latest` in {root}: {e.strerror or e}"
                raise UserError(
                    f"{what}; checkpoint {final.name} was saved complete, and resuming finds it without `latest`: "
                    f"free space and continue with {CONTINUE}"
                ) from None
            prune(root, cfg.checkpoint.keep_last, step)
            faults.hit("ckpt_done", step)

    phase(finish)  # every rank stops with the main process's line, none waits at a barrier for it
    return final


# Model fields that may change on resume without changing the weights' shapes or meaning.
_RESUMABLE_MODEL_FIELDS = {
    "aux_loss_coef",
    "z_loss_coef",
    "router_jitter",
    "capacity_factor",
    "experts_impl",
    "aux_free_update_rate",
    "max_seq_len",
    "init_std",
}


def check_compatible(ckpt_cfg: Config, cfg: Config, where: Path) -> None:
    """Refuse a resume whose config changes the model's shape."""
    old, new = ckpt_cfg.model.__dict__, cfg.model.__dict__
    changed = [k for k in old if k not in _RESUMABLE_MODEL_FIELDS and old[k] != new[k]]
    if changed:
        k = changed[0]
        raise UserError(
            f"checkpoint {where} has model.{k} = {old[k]!r} but the config says {new[k]!r}; a resume cannot change "
            f"the model's shape — restore model.{k} or start a new run (train.init_from cannot reshape either)"
        )


def load_checkpoint(
    cfg: Config, backend: StateBackend, path: Path, weights_only: bool = False
) -> RunState | None:
    """Restore model (+ optimizer, scheduler unless weights_only); returns what else the run
    continues from (trainer state, data position, this rank's RNG), None with weights_only."""
    ckpt_cfg = load_config(path / "config.yaml")
    check_compatible(ckpt_cfg, cfg, path)
    backend.load_state(path, weights_only=weights_only)
    if weights_only:
        return None
    return load_run_state(path, ckpt_cfg, backend.rank, backend.world_size)


def write_weights_checkpoint(directory: Path, cfg: Config, state: dict[str, torch.Tensor]) -> None:
    """A step-0 checkpoint of weights only (an import or an upcycle), which `load_pretrained` and
    `train.init_from` accept."""
    check_state(cfg.model, state, "the converted weights")
    (directory / "config.yaml").write_text(cfg.to_yaml())
    save_weights(directory, state)
    trainer_state = {"step": 0, "tokens": 0, "world_size": 1, "last_metrics": {}, "val_loss": None}
    (directory / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    write_manifest(directory)  # train.init_from only accepts a checkpoint whose manifest verifies
