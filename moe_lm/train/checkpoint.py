"""Checkpoints: one directory per step, written under a temp name and renamed (atomic), with a manifest.

Layout of `RUN/checkpoints/step-N/`:
  config.yaml                       the resolved run config
  model-ep{r}-of-{n}.safetensors    weights, experts keyed by global index (see weights.py)
  optim-ep{r}-of-{n}.pt             optimizer + scheduler state of the parameters that file's rank held
  rank{r}.pt                        per-rank training RNG state and data-loader position
  trainer_state.json                step, tokens, last metrics
  MANIFEST.json                     size and sha256 of every file above; written last
`RUN/checkpoints/latest` names the newest complete checkpoint (for tools; resuming scans the
directories). A directory without a valid manifest is never picked: `find_latest` falls back to the
previous complete one and says so. Anything named `.tmp-*` is an unfinished write or delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

from moe_lm.config import Config, load_config
from moe_lm.errors import UserError
from moe_lm.train import faults

MANIFEST = "MANIFEST.json"
TMP_PREFIX = ".tmp-"


class StateBackend(Protocol):
    rank: int
    world_size: int
    is_main: bool

    def save_state(self, directory: Path) -> None: ...
    def load_state(self, directory: Path, weights_only: bool = False) -> None: ...
    def barrier(self) -> None: ...
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> None:
    files = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
            files[f.name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    with open(directory / MANIFEST, "w") as out:
        out.write(json.dumps({"files": files}, indent=1))
        out.flush()
        os.fsync(out.fileno())  # the manifest vouches for the rest: it must reach the disk before the rename


def verify(directory: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (the write did not finish)"
    try:
        files = {
            str(name): (int(meta["size"]), str(meta["sha256"]))
            for name, meta in json.loads(manifest.read_text())["files"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    # Sizes first: a truncated file is found without hashing gigabytes.
    for name, (size, _) in files.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size} (truncated)"
    for name, (_, digest) in files.items():
        if _sha256(directory / name) != digest:
            return f"{name} does not match its checksum (corrupted)"
    return None


def step_dirs(ckpt_root: Path) -> list[Path]:
    """step-N directories, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


def find_latest(ckpt_root: Path, warn: bool = True) -> Path | None:
    """Newest complete checkpoint; each damaged newer one is named on stderr with the fallback taken."""
    damaged: list[tuple[Path, str]] = []
    found = None
    for candidate in step_dirs(ckpt_root):
        problem = verify(candidate)
        if problem is None:
            found = candidate
            break
        damaged.append((candidate, problem))
    if warn:
        fallback = f"falling back to {found.name}" if found else "no earlier complete checkpoint"
        for path, problem in damaged:
            print(f"warning: checkpoint {path} is damaged ({problem}); {fallback}", file=sys.stderr)
    return found


def resolve_resume(spec: str, run_dir: Path, key: str | None = "train.resume") -> Path:
    """A verified checkpoint dir from: `latest` (this run's newest complete one), a run directory,
    its checkpoints/ directory, or a checkpoint directory. `key` names the setting in errors
    (train.resume, train.init_from), or None for a command-line argument."""
    what = f"{key}={spec}" if key else f"'{spec}'"
    path = Path(spec)
    root = None
    if key and spec == "latest":
        root = run_dir / "checkpoints"
    elif (path / "checkpoints").is_dir():
        root = path / "checkpoints"
    elif (path / "latest").is_file() or any(path.glob("step-*")):
        root = path
    if root is not None:
        found = find_latest(root)
        if found is None:
            fix = f"start without {key}" if key else "train longer"
            raise UserError(
                f"{what} but {root} holds no complete checkpoint; {fix} or point it at a checkpoint directory"
            )
        return found
    if not path.is_dir():
        raise UserError(
            f"{what}: no such checkpoint directory; use latest, a run directory or a checkpoints/step-N path"
        )
    if not (path / MANIFEST).is_file() and not any(path.glob("model-ep*-of-*.safetensors")):
        raise UserError(
            f"{what}: that directory holds no checkpoint (no {MANIFEST}, no model weights); "
            "use latest, a run directory or a RUN/checkpoints/step-N directory"
        )
    problem = verify(path)
    if problem is not None:
        raise UserError(f"checkpoint {path} is not usable: {problem}; resume from an earlier one")
    return path


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


def write_pointer(ckpt_root: Path, name: str) -> None:
    """`latest` names a checkpoint for tools (eval, export); written atomically via a temp file."""
    pointer = ckpt_root / f"{TMP_PREFIX}latest"
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


def _write_error(e: BaseException) -> str | None:
    """The reason, when `e` means the disk refused a write (full, quota, read-only, I/O error)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)  # torch.save and safetensors wrap the OSError in their own exception types
    for marker in ("No space left", "StorageFull", "file write failed", "Disk quota"):
        if marker in text:
            return text.splitlines()[0] if text.strip() else type(e).__name__
    return None


def _raise_write_error(error: BaseException | None, final: Path, root: Path) -> None:
    if error is None:
        raise UserError(f"another process failed to write checkpoint {final.name} in {root}; see its error")
    reason = _write_error(error)
    if reason is None:
        raise error
    pointer = root / "latest"
    kept = f"{pointer.read_text().strip()} is intact" if pointer.is_file() else "no earlier checkpoint exists"
    raise UserError(
        f"cannot write checkpoint {final.name} in {root}: {reason}; {kept} — free disk space "
        "(or lower checkpoint.keep_last) and resume with train.resume=latest"
    ) from None


def save_checkpoint(
    cfg: Config,
    backend: StateBackend,
    step: int,
    rank_state: dict[str, Any],
    trainer_state: dict[str, Any],
) -> Path:
    """Every rank calls this. Returns the final directory. keep-last-N pruning happens here too.

    Until the rename, everything lives in a temp dir: a kill leaves it behind (cleaned on the next
    start), a write error removes it and raises one line; earlier checkpoints are never touched.
    """
    root = cfg.output_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f"{TMP_PREFIX}step-{step}"

    def phase(work: Any) -> None:
        """Run one rank's share of a phase; every rank learns whether any rank failed, so a full disk
        on one rank cannot leave the others waiting at a barrier forever."""
        error: BaseException | None = None
        try:
            work()
        except Exception as e:
            error = e
        failed = float(backend.all_reduce(torch.tensor([0.0 if error is None else 1.0]), "sum")[0])
        if failed:
            if backend.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            _raise_write_error(error, final, root)

    def own_files() -> None:
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        backend.barrier()
        backend.save_state(tmp)
        torch.save(rank_state, tmp / f"rank{backend.rank}.pt")
        faults.hit("ckpt_files", step, tmp)

    def seal() -> None:
        if backend.is_main:
            (tmp / "config.yaml").write_text(cfg.to_yaml())
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            write_manifest(tmp)
            faults.hit("ckpt_manifest", step)
            if final.exists():  # a re-run of the same step (e.g. after a crash right after the rename)
                _discard(final)
            os.replace(tmp, final)
            _fsync_dir(root)

    phase(own_files)
    phase(seal)
    if backend.is_main:
        faults.hit("ckpt_renamed", step)
        write_pointer(root, final.name)
        prune(root, cfg.checkpoint.keep_last, step)
        faults.hit("ckpt_done", step)
    backend.barrier()
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
) -> dict[str, Any]:
    """Restore model (+ optimizer, scheduler unless weights_only); returns the rank/trainer state
    (the rank state holds what the trainer saved: loader position, training RNG)."""
    ckpt_cfg = load_config(path / "config.yaml")
    check_compatible(ckpt_cfg, cfg, path)
    backend.load_state(path, weights_only=weights_only)
    if weights_only:
        return {}
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    rank_file = path / f"rank{backend.rank}.pt"
    rank_state: dict[str, Any] = {}
    if rank_file.is_file():
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return {"trainer": trainer_state, "rank": rank_state}
