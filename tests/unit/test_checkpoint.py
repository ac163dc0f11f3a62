"""Checkpoint files on disk (manifest, fallback, pruning, temp dirs, a full disk) and the pre-flight
memory estimate. A fake backend writes the state files, so no model is built."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_lm import faults, fsutil
from moe_lm.config import Config, config_from_dict, load_config
from moe_lm.errors import UserError
from moe_lm.state import checkpoint as ckpt
from moe_lm.state.manifest import verify
from moe_lm.state.resolve import find_latest, resolve_checkpoint, resolve_resume
from moe_lm.state.write_errors import PeerWriteError
from moe_lm.train.preflight import GIB, check_memory, estimate_memory

REPO = Path(__file__).resolve().parents[2]


class FakeBackend:
    """Rank 0 of one process, or of two whose (simulated) rank 1 fails with `peer_line` (what
    write_errors.py sends: "kind:one line")."""

    rank, is_main = 0, True

    def __init__(self, fail: BaseException | None = None, peer_line: str | None = None) -> None:
        self.fail = fail
        self.peer_line = peer_line
        self.world_size = 1 if peer_line is None else 2
        self.writing = False  # the peer fails writing its own files, after the main process made the dir

    def save_state(self, directory: Path) -> None:
        self.writing = True
        (directory / "model-ep0-of-1.safetensors").write_bytes(b"w" * 1000)
        if self.fail is not None:
            raise self.fail
        (directory / "optim-ep0-of-1.pt").write_bytes(b"o" * 2000)

    def load_state(self, directory: Path, weights_only: bool = False) -> None:
        pass

    def barrier(self) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.peer_line is None:
            return tensor
        if tensor.dim() == 1:  # "did anyone fail": the peer did, once writing
            return tensor + 1 if self.writing else tensor
        out = tensor.clone()  # the reasons: the peer's in row 1
        encoded = list(self.peer_line.encode())
        out[1, : len(encoded)] = torch.tensor(encoded, dtype=out.dtype)
        return out


def cfg_at(tmp_path: Path, keep_last: int = 2) -> Config:
    return config_from_dict(
        {"train": {"output_dir": str(tmp_path / "run")}, "checkpoint": {"keep_last": keep_last}}
    )


RNG = {"torch": torch.arange(5, dtype=torch.uint8)}


def save(cfg: Config, step: int, backend: FakeBackend | None = None) -> Path:
    return ckpt.save_checkpoint(cfg, backend or FakeBackend(), step, RNG, {"samples": step}, {"step": step})


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_save_writes_manifest_pointer_and_keeps_last_n(tmp_path):
    cfg = cfg_at(tmp_path)
    for step in range(1, 5):
        save(cfg, step)
    root = cfg.output_dir / "checkpoints"
    assert names(root) == ["latest", "step-3", "step-4"]
    assert (root / "latest").read_text() == "step-4"
    manifest = json.loads((root / "step-4" / "MANIFEST.json").read_text())["files"]
    assert set(manifest) == {
        "config.yaml",
        "model-ep0-of-1.safetensors",
        "optim-ep0-of-1.pt",
        "rng-rank0.safetensors",
        "data_position.json",
        "trainer_state.json",
    }
    assert manifest["optim-ep0-of-1.pt"]["size"] == 2000
    assert verify(root / "step-4") is None
    # no pickle: the data position is JSON, the RNG state safetensors
    assert json.loads((root / "step-4" / "data_position.json").read_text()) == {"samples": 4}
    assert torch.equal(load_file(str(root / "step-4" / "rng-rank0.safetensors"))["torch"], RNG["torch"])
    assert load_config(root / "step-4" / "config.yaml") == cfg


def _truncate(d: Path) -> None:
    (d / "optim-ep0-of-1.pt").write_bytes(b"o" * 10)


def _flip(d: Path) -> None:
    (d / "optim-ep0-of-1.pt").write_bytes(b"o" * 1999 + b"x")


DAMAGE = [
    ("no-manifest", lambda d: (d / "MANIFEST.json").unlink(), "no MANIFEST.json (the write did not finish)"),
    (
        "bad-manifest",
        lambda d: (d / "MANIFEST.json").write_text('{"files": [1'),
        "MANIFEST.json is unreadable",
    ),
    ("missing", lambda d: (d / "rng-rank0.safetensors").unlink(), "rng-rank0.safetensors is missing"),
    ("truncated", _truncate, "optim-ep0-of-1.pt has 10 bytes, the manifest says 2000 (truncated)"),
    ("corrupted", _flip, "optim-ep0-of-1.pt does not match its checksum (corrupted)"),
]


@pytest.mark.parametrize(("damage", "problem"), [(d[1], d[2]) for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_newest_is_skipped_with_a_message_naming_the_fallback(tmp_path, capsys, damage, problem):
    cfg = cfg_at(tmp_path, keep_last=0)
    for step in (1, 2, 3):
        save(cfg, step)
    root = cfg.output_dir / "checkpoints"
    damage(root / "step-3")
    assert verify(root / "step-3") == problem
    capsys.readouterr()
    assert find_latest(root) == root / "step-2"
    err = capsys.readouterr().err
    assert err == f"warning: checkpoint {root / 'step-3'} is damaged ({problem}); falling back to step-2\n"
    assert resolve_resume("latest", cfg.output_dir) == root / "step-2"
    with pytest.raises(UserError, match=r"step-3 is not usable: .*; resume from an earlier one"):
        resolve_resume(str(root / "step-3"), cfg.output_dir)


def test_no_complete_checkpoint_at_all(tmp_path, capsys):
    cfg = cfg_at(tmp_path)
    save(cfg, 1)
    root = cfg.output_dir / "checkpoints"
    _truncate(root / "step-1")
    assert find_latest(root) is None
    assert "no earlier complete checkpoint" in capsys.readouterr().err
    # One line, with the damage as the reason (the warning would be a second line) and no deletion.
    with pytest.raises(
        UserError,
        match=r"every checkpoint in .* is damaged \(step-1: optim-ep0-of-1.pt has 10 bytes.*nothing was deleted",
    ):
        resolve_resume("latest", cfg.output_dir)
    assert capsys.readouterr().err == ""
    assert (root / "step-1").is_dir()
    (root / "step-1").rename(root / ".moved")
    with pytest.raises(UserError, match="holds no complete checkpoint; start without train.resume"):
        resolve_resume("latest", cfg.output_dir)


@pytest.mark.parametrize(
    "fail",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),  # safetensors
        None,  # the injected fault: MOE_LM_FAULT=enospc:2
    ],
    ids=["oserror", "quota", "safetensors-wrapped", "injected"],
)
def test_full_disk_keeps_earlier_checkpoints_and_says_what_it_needed(tmp_path, monkeypatch, fail):
    cfg = cfg_at(tmp_path)
    save(cfg, 1)
    root = cfg.output_dir / "checkpoints"
    before = {p.name: p.read_bytes() for p in (root / "step-1").iterdir()}
    needed = sum(p.stat().st_size for p in (root / "step-1").iterdir() if p.name != "MANIFEST.json")
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 12345)
    if fail is None:
        monkeypatch.setenv(faults.ENV, "enospc:2")
    with pytest.raises(fsutil.DiskFullError) as info:
        save(cfg, 2, FakeBackend(fail))
    # 12,345 bytes are more than the tiny checkpoint needs: the line says why the write still failed
    why = (
        "the disk quota is exhausted, so the free space is not this user's to use: free space under the quota"
        if fail is not None and "quota" in str(fail)
        else "there is room now, so the disk filled while writing (another writer) or the rest is reserved"
    )
    assert needed < 12345
    assert str(info.value) == (
        f"disk full: cannot write checkpoint step-2 to {root}: it needs {fsutil.human_bytes(needed)} and 12.1 KiB "
        f"(12,345 bytes) are free; {why}; nothing of step-2 was kept and checkpoint step-1 is intact: free space (or "
        "lower checkpoint.keep_last) and continue with train.resume=auto"
    )
    assert names(root) == ["latest", "step-1"]  # the temp dir is gone
    assert (root / "latest").read_text() == "step-1"
    assert {p.name: p.read_bytes() for p in (root / "step-1").iterdir()} == before


def test_a_full_disk_without_inodes_says_so_not_just_the_free_bytes(tmp_path, monkeypatch):
    """ENOSPC with gigabytes free: the inodes ran out, and freeing bytes would not help."""
    import os

    real = os.statvfs

    def no_inodes(path):
        st = real(path)
        return os.statvfs_result((*st[:5], 1000, 0, 0, *st[8:]))

    monkeypatch.setattr(os, "statvfs", no_inodes)
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 10**9)
    line = str(fsutil.disk_full("checkpoint step-2", tmp_path, 5000, cause=OSError(errno.ENOSPC, "No space")))
    assert line.endswith(
        "are free; but no inodes are left (the filesystem holds 1,000 files): delete files, not just bytes"
    )


def test_a_full_disk_at_the_first_checkpoint_estimates_the_size_from_the_model(tmp_path, monkeypatch):
    from moe_lm.model.params import count_params

    cfg = cfg_at(tmp_path)
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 0)
    with pytest.raises(fsutil.DiskFullError) as info:
        save(cfg, 1, FakeBackend(OSError(errno.ENOSPC, "No space left on device")))
    estimate = 12 * count_params(cfg.model).total_params  # fp32 weights + AdamW's two moments
    assert f"it needs about {fsutil.human_bytes(estimate)} and 0 bytes are free" in str(info.value)
    assert "no earlier checkpoint exists: free space" in str(info.value)


def test_other_errors_propagate_but_leave_no_temp_dir(tmp_path):
    cfg = cfg_at(tmp_path)
    with pytest.raises(ValueError, match="a bug"):
        save(cfg, 1, FakeBackend(ValueError("a bug")))
    assert names(cfg.output_dir / "checkpoints") == []


def test_prune_spares_newer_checkpoints_and_drops_damaged_older_ones(tmp_path):
    cfg = cfg_at(tmp_path, keep_last=0)
    for step in (2, 4, 6, 8, 10):
        save(cfg, step)
    root = cfg.output_dir / "checkpoints"
    (root / "step-2" / "MANIFEST.json").unlink()  # damaged and old
    ckpt.prune(root, keep_last=2, current=6)  # as after resuming from step-6: 8 and 10 are not ours
    assert names(root) == ["latest", "step-10", "step-4", "step-6", "step-8"]
    ckpt.prune(root, keep_last=1, current=10)
    assert names(root) == ["latest", "step-10"]


def test_resave_of_a_step_replaces_it(tmp_path):
    cfg = cfg_at(tmp_path)
    save(cfg, 3)
    (cfg.output_dir / "checkpoints" / "step-3" / "stray").write_text("from the run that crashed")
    save(cfg, 3)
    assert "stray" not in names(cfg.output_dir / "checkpoints" / "step-3")
    assert verify(cfg.output_dir / "checkpoints" / "step-3") is None


def test_clean_temp_removes_only_unfinished_work(tmp_path):
    root = tmp_path / "checkpoints"
    for name in (".tmp-step-5", ".tmp-del-step-1", "step-3"):
        (root / name).mkdir(parents=True)
        (root / name / "f").write_text("x")
    (root / ".tmp-latest").write_text("step-3")
    removed = ckpt.clean_temp(root)
    assert [p.name for p in removed] == [".tmp-del-step-1", ".tmp-latest", ".tmp-step-5"]
    assert names(root) == ["step-3"]


def test_resolve_resume_rejects_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint directory; use latest"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoint .* use latest, a run directory"):
        resolve_resume(str(tmp_path / "empty"), tmp_path)


def test_fault_points_are_inert_unless_armed_and_typos_fail(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.hit("ckpt_files", 1)
    assert faults.poison(torch.tensor(1.0), 1).item() == 1.0
    monkeypatch.setenv(faults.ENV, "nan:2")
    assert faults.poison(torch.tensor(1.0), 1).item() == 1.0
    assert torch.isnan(faults.poison(torch.tensor(1.0), 2))
    monkeypatch.setenv(faults.ENV, "ckpt_file:2")
    with pytest.raises(ValueError, match="expected <point>:<step>"):
        faults.hit("ckpt_files", 2)


# ---- pre-flight memory estimate -------------------------------------------------------------

TINY = {
    "model": dict(
        vocab_size=100,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_seq_len=8,
        num_experts=4,
        top_k=2,
    ),
    "data": dict(seq_len=8),
    "train": dict(micro_batch_size=2, mixed_precision="no"),
    "parallel": dict(ep_size=2),
}


def tiny(**sections: dict[str, object]) -> Config:
    return config_from_dict({k: {**TINY.get(k, {}), **sections.get(k, {})} for k in {*TINY, *sections}})


def test_memory_estimate_matches_a_hand_computation():
    # Parameters: embedding 100*8 = 800, lm_head 800, attention q 8*8 + k 4*8 + v 4*8 + o 8*8 = 192,
    # norms 3*8 = 24, router 4*8 = 32, experts 4 * (2*16*8 + 8*16) = 1536, of which ep_size=2 holds 768.
    params = 800 + 800 + 192 + 24 + 32 + 768
    est = estimate_memory(tiny(), world_size=2)
    assert est.params == params == 2616
    assert (est.weights, est.grads, est.optimizer) == (4 * params, 4 * params, 8 * params)
    # Per token, one layer: attention 3*8 + 2*2*4 + 2*1*4 + heads*seq 2*8 = 64; FFN input+residual 16;
    # MoE 2 * (2*8 + 3*16) + 4 = 132 -> 212 elements, fp32. 16 tokens. Logits 16 * 100 * 8 bytes.
    assert est.activations == 16 * 212 * 4 + 16 * 100 * 8 == 26368
    assert est.total == 68224
    # Activation checkpointing keeps one H-vector per layer plus one layer: 8 + 212 elements.
    assert (
        estimate_memory(tiny(train={"activation_checkpointing": True}), 2).activations == 16 * 220 * 4 + 12800
    )
    # ZeRO-2 over 2 ranks with ep 2: dense state split in two, experts' not (one rank per expert group).
    zero = estimate_memory(tiny(parallel={"backend": "deepspeed", "zero_stage": 2}), 2)
    assert (zero.optimizer, zero.grads) == (8 * (1848 // 2 + 768), 4 * (1848 // 2 + 768))
    # bf16 autocast halves the activations but not the logits
    assert (
        estimate_memory(tiny(train={"mixed_precision": "auto"}), 2, "cuda").activations
        == 16 * 212 * 2 + 12800
    )


def test_a_huge_config_warns_and_a_tiny_one_does_not(capsys):
    cfg = load_config(REPO / "configs" / "mixtral-8x7b.yaml")
    est = estimate_memory(cfg, world_size=8)
    # 46.7B parameters, 45.1B of them in experts spread over ep_size=8: 1.61B dense + 5.64B experts each
    assert est.params == (46_702_792_704 - 45_097_156_608) + 45_097_156_608 // 8
    assert est.total > 80 * GIB
    gpu = (80 * GIB, "a test GPU")
    message = check_memory(cfg, 8, torch.device("cpu"), available=gpu)
    assert message is not None and "\n" not in message
    assert message.startswith(f"warning: this config needs about {est.total / GIB:.1f} GiB per process")
    assert "but a test GPU gives 80.0 GiB; lower train.micro_batch_size" in message
    assert capsys.readouterr().err == message + "\n"
    assert check_memory(tiny(), 2, torch.device("cpu"), available=gpu) is None
    assert check_memory(tiny(), 2, torch.device("cpu")) is None  # this machine's real RAM


def test_write_failure_on_another_rank_stops_every_rank_with_its_reason(tmp_path: Path) -> None:
    """A full disk on one rank raised there while the others waited at a barrier forever; then the
    others said "another process failed to write checkpoint ...; see its error", a line that hid
    the cause. Now every rank raises the failing rank's own line."""
    cfg = cfg_at(tmp_path)
    save(cfg, 1)
    root = cfg.output_dir / "checkpoints"
    peer = f"disk:disk full: cannot write checkpoint step-2 to {root}: it needs 9 bytes and 0 bytes are free; ..."
    with pytest.raises(fsutil.DiskFullError) as full:
        save(cfg, 2, FakeBackend(peer_line=peer))
    assert str(full.value) == peer[len("disk:") :]
    with pytest.raises(UserError, match=r"^cannot write checkpoint step-2 in .*: Read-only file system"):
        save(
            cfg,
            2,
            FakeBackend(peer_line=f"user:cannot write checkpoint step-2 in {root}: Read-only file system"),
        )
    with pytest.raises(PeerWriteError) as crash:
        save(cfg, 2, FakeBackend(peer_line="crash:KeyError: 'exp_avg'"))
    assert str(crash.value) == (
        f"process 1 failed while writing checkpoint step-2 in {root} (KeyError: 'exp_avg'); this process stopped "
        "because of it, see process 1's traceback for the cause; checkpoint step-1 is intact"
    )
    with pytest.raises(ValueError, match="a bug"):  # this rank's own crash is re-raised as it was
        save(cfg, 2, FakeBackend(ValueError("a bug"), peer_line="crash:KeyError: 'exp_avg'"))
    # a full disk anywhere is the cause, whatever a peer's own broken write says
    with pytest.raises(fsutil.DiskFullError, match="^disk full: cannot write checkpoint step-2"):
        save(
            cfg, 2, FakeBackend(OSError(errno.ENOSPC, "No space left"), peer_line="crash:RuntimeError: gloo")
        )
    assert names(root) == ["latest", "step-1"]
    assert (root / "latest").read_text() == "step-1"
    assert verify(root / "step-1") is None


def test_resolution_errors_name_the_setting_they_came_from(tmp_path):
    # Regression: a bad train.init_from was reported as train.resume.
    with pytest.raises(UserError, match=r"^train.init_from=.*nope: no such checkpoint directory"):
        resolve_resume(str(tmp_path / "nope"), tmp_path, key="train.init_from")
    # the eval / export path: a CLI argument
    with pytest.raises(UserError, match=r"^'.*nope': no such checkpoint directory"):
        resolve_checkpoint(tmp_path / "nope")
