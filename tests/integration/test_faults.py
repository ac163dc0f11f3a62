"""Crash safety, graceful stop and numerical guards, through real training runs.

A subprocess trains with `MOE_LM_FAULT=<point>:<step>` (moe_lm/faults.py) and SIGKILLs itself
at that exact point; the test then resumes in-process with `train.resume=latest` and checks that
the finished run equals one uninterrupted run bit for bit (same topology: one CPU process).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from moe_lm.cli import main
from moe_lm.state.manifest import verify, write_manifest
from moe_lm.state.resolve import find_latest
from moe_lm.state.weights import load_model_state
from moe_lm.train import preflight
from tests.integration.conftest import run_config_dict

STEPS, EVERY, KEEP = 8, 2, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in the subprocesses (OMP_NUM_THREADS): with this tiny model it is
    twice as fast on a shared 2-core machine, and bit-identity needs the same count everywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def make_run(corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """name -> a YAML config path for a run of STEPS steps in its own directory (one shared data cache)."""
    root = tmp_path_factory.mktemp("faults")

    def make(name: str, **sections: dict[str, Any]) -> Path:
        merged = {
            "train": {"max_steps": STEPS},
            "checkpoint": {"every": EVERY, "keep_last": KEEP},
            "logging": {"peak_tflops": 1.0},  # skips the CPU matmul probe that MFU would otherwise run
        }
        for key, values in sections.items():
            merged[key] = {**merged.get(key, {}), **values}
        data = run_config_dict(corpus, tokenizer_dir, root / name, **merged)
        data["data"]["cache_dir"] = str(root / "cache")
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


def run_dir(cfg_path: Path) -> Path:
    return Path(yaml.safe_load(cfg_path.read_text())["train"]["output_dir"])


def train_records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(make_run) -> Path:
    """The uninterrupted run every interrupted one must equal; trained once per module."""
    cfg = make_run("reference")
    assert main(["train", str(cfg)]) == 0
    return run_dir(cfg)


def assert_same_as(run: Path, ref: Path) -> None:
    ours, theirs = train_records(run), train_records(ref)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))  # each step logged exactly once
    for a, b in zip(ours, theirs, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "expert_load"):
            assert a[key] == b[key], (a["step"], key)
    wa = load_model_state(run / "checkpoints" / f"step-{STEPS}")
    wb = load_model_state(ref / "checkpoints" / f"step-{STEPS}")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # keep-last-N honoured, no temp leftovers, `latest` names the end
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", f"step-{STEPS - EVERY}", f"step-{STEPS}"]
    assert (ckpts / "latest").read_text() == f"step-{STEPS}"


def start(cfg: Path, fault: str, **popen: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "MOE_LM_FAULT": fault, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "moe_lm.cli", "train", str(cfg)], env=env, text=True, cwd=cfg.parent, **popen
    )


def resume(cfg: Path, capsys: pytest.CaptureFixture[str], expect_step: int) -> str:
    capsys.readouterr()
    assert main(["train", str(cfg), "train.resume=latest"]) == 0
    out, err = capsys.readouterr()
    run = run_dir(cfg)
    assert f"resumed from {run / 'checkpoints' / f'step-{expect_step}'} at step {expect_step}" in out
    return err


# point, step it fires at, the checkpoint a resume must start from (EVERY=2, KEEP=2), what is on disk
KILLS = [
    ("mid_step", 5, 4, "nothing new"),
    ("ckpt_files", 6, 4, "a temp dir with weights, no manifest"),
    ("ckpt_manifest", 6, 4, "a temp dir with a manifest, not renamed"),
    ("ckpt_renamed", 6, 6, "step-6 complete, latest still step-4"),
    ("ckpt_done", 6, 6, "step-6 complete and pruned"),
    ("prune", 6, 6, "step-2 renamed for deletion, not deleted"),
    ("metrics", 5, 4, "half a JSON line at the end of metrics.jsonl"),
]


@pytest.mark.parametrize(("point", "step", "resume_at", "left"), KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_then_resume_equals_uninterrupted(make_run, reference, capsys, point, step, resume_at, left):
    cfg = make_run(f"kill-{point}")
    proc = start(cfg, f"{point}:{step}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    ckpts = run_dir(cfg) / "checkpoints"
    # every visible step-N is complete: a half-written checkpoint never looks like one
    assert all(verify(d) is None for d in ckpts.glob("step-*")), left
    latest = find_latest(ckpts, warn=False)
    assert latest is not None and latest.name == f"step-{resume_at}"  # lost only steps since it
    temps = sorted(p.name for p in ckpts.glob(".tmp-*"))
    if point in ("ckpt_files", "ckpt_manifest"):
        assert temps == [f".tmp-step-{step}"]
        assert (ckpts / temps[0] / "MANIFEST.json").is_file() == (point == "ckpt_manifest")
        assert any((ckpts / temps[0]).glob("model-*.safetensors"))
    elif point == "prune":
        assert temps == [".tmp-del-step-2"]
    else:
        assert temps == []
    if point == "ckpt_renamed":
        assert (ckpts / "latest").read_text() == "step-4"
    if point == "metrics":
        last = (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()[-1]
        with pytest.raises(json.JSONDecodeError):
            json.loads(last)

    err = resume(cfg, capsys, resume_at)
    for name in temps:
        assert f"removed {name} in {ckpts}" in err  # temp dirs are cleaned on start
    assert_same_as(run_dir(cfg), reference)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_saves_at_step_boundary_and_exits_0(make_run, reference, capsys, sig):
    cfg = make_run(f"stop-{sig.name}")
    # pause:3 holds the run inside step 3 until the signal arrives, so the stop step is known.
    proc = start(cfg, "pause:3", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("fault: paused at step 3"):
            proc.send_signal(sig)
            break
    out = line + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "stop requested: saving a checkpoint at step 3 and exiting" in out
    ckpts = run_dir(cfg) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-3" and verify(ckpts / "step-3") is None
    resume(cfg, capsys, 3)
    assert_same_as(run_dir(cfg), reference)


# A preemptible job's one command: killed before its first checkpoint, during it, and after it.
REQUEUES = [("mid_step:1", None), ("ckpt_files:2", None), ("mid_step:5", 4)]


@pytest.mark.parametrize(("fault", "resume_at"), REQUEUES, ids=[r[0] for r in REQUEUES])
def test_requeue_with_resume_auto_equals_uninterrupted(make_run, reference, capsys, fault, resume_at):
    cfg = make_run(f"requeue-{fault.replace(':', '-')}", train={"resume": "auto"})
    proc = start(cfg, fault, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 0  # the same command line again
    out = capsys.readouterr().out
    if resume_at is None:
        assert "train.resume=auto: no checkpoint in" in out and "replacing what an earlier start left" in out
    else:
        assert f"at step {resume_at}" in out
    assert_same_as(run_dir(cfg), reference)
    assert main(["train", str(cfg)]) == 0  # and once more, after the end: nothing to do
    assert f"training already finished at step {STEPS}" in capsys.readouterr().out
    assert_same_as(run_dir(cfg), reference)


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_newest_checkpoint_falls_back_and_says_so(make_run, reference, capsys, tmp_path, damage):
    cfg = make_run(f"damaged-{damage}")
    shutil.copytree(reference, run_dir(cfg))
    newest = run_dir(cfg) / "checkpoints" / f"step-{STEPS}"
    if damage == "corrupt":  # one flipped byte, size unchanged
        victim = newest / "model-ep0-of-1.safetensors"
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
        problem = "model-ep0-of-1.safetensors does not match its checksum (corrupted)"
    else:
        victim = newest / "optim-ep0-of-1.safetensors"
        size = victim.stat().st_size
        with open(victim, "r+b") as f:
            f.truncate(size // 2)
        problem = f"optim-ep0-of-1.safetensors has {size // 2} bytes, the manifest says {size} (truncated)"
    err = resume(cfg, capsys, STEPS - EVERY)
    assert f"warning: checkpoint {newest} is damaged ({problem}); falling back to step-{STEPS - EVERY}" in err
    assert_same_as(run_dir(cfg), reference)


def test_nonfinite_step_is_skipped_and_logged(make_run, capsys, monkeypatch):
    cfg = make_run("nan-once", train={"max_steps": 4}, checkpoint={"every": 1, "keep_last": 0})
    monkeypatch.setenv("MOE_LM_FAULT", "nan:3")
    assert main(["train", str(cfg)]) == 0
    assert "warning: step 3: non-finite loss or gradient norm; update skipped" in capsys.readouterr().out
    ckpts = run_dir(cfg) / "checkpoints"
    # no checkpoint of the skipped step (its state is suspect); saving resumes once steps are finite
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-1", "step-2", "step-4"]
    optim = load_file(str(ckpts / "step-4" / "optim-ep0-of-1.safetensors"))
    steps = {float(v) for k, v in optim.items() if k.endswith("/step")}
    assert steps == {3.0}  # 4 steps, 3 updates: step 3 changed nothing
    w2, w4 = (load_model_state(ckpts / f"step-{s}") for s in (2, 4))
    assert not all(torch.equal(w2[k], w4[k]) for k in w2)  # and training went on


def test_divergence_stops_with_one_line_naming_the_step(make_run, capsys):
    cfg = make_run(
        "diverge",
        optim={"lr": 1e30},
        train={"max_nonfinite_steps": 2},
        checkpoint={"every": 1, "keep_last": 0},
    )
    assert main(["train", str(cfg)]) == 2
    out, err = capsys.readouterr()
    ckpts = run_dir(cfg) / "checkpoints"
    assert err.count("\n") == 1 and err.startswith("error: training diverged: 2 non-finite steps in a row")
    assert "ending at step 3;" in err and f"last good checkpoint: {ckpts / 'step-1'};" in err
    assert "lower optim.lr" in err
    # the checkpoint written before is kept and intact; none while steps were being skipped
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-1"]
    assert verify(ckpts / "step-1") is None


def test_router_collapse_warning_fires(make_run, capsys):
    # A checkpoint whose aux-free selection bias sends every token to experts 0 and 1 (top-2 of 4):
    # every MoE layer then has imbalance max/mean = 2.0 on every step of a real run.
    model = {"aux_free_bias": True}
    seed = make_run("collapse-seed", model=model, train={"max_steps": 1})
    assert main(["train", str(seed)]) == 0
    ckpt = run_dir(seed) / "checkpoints" / "step-1"
    weights = load_file(str(ckpt / "model-ep0-of-1.safetensors"))
    biased = [k for k in weights if k.endswith("router.expert_bias")]
    assert len(biased) == 2
    for k in biased:
        weights[k] = torch.tensor([10.0, 10.0, 0.0, 0.0])
    save_file(weights, str(ckpt / "model-ep0-of-1.safetensors"))
    write_manifest(ckpt)
    cfg = make_run(
        "collapse",
        model=model,
        train={"max_steps": 4, "init_from": str(ckpt), "collapse_ratio": 1.5, "collapse_patience": 3},
        checkpoint={"every": 0},
    )
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert all(r["imbalance"] == [2.0, 2.0] for r in train_records(run_dir(cfg)))
    warnings = [line for line in out.splitlines() if "router collapse?" in line]
    assert len(warnings) == 1  # once, when the streak reaches the patience
    assert "for 3 logging steps (imbalance 2.00 at step 3)" in warnings[0]


def test_preflight_warns_before_the_first_step(make_run, capsys, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(preflight, "available_memory", lambda device, world=1: (1024, "a 1 KiB test device"))
    from moe_lm.train.trainer import Trainer

    real_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: calls.append("step") or real_step(self))
    real_check = preflight.check_memory

    def check(*args: Any, **kwargs: Any) -> str | None:
        calls.append("preflight")
        return real_check(*args, **kwargs)

    monkeypatch.setattr("moe_lm.train.trainer.check_memory", check)
    cfg = make_run("preflight", train={"max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert calls == ["preflight", "step"]
    assert "warning: this config needs about" in err and "but a 1 KiB test device gives 0.0 GiB" in err
