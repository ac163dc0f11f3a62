"""What an operator sees and gets besides metrics.jsonl: the progress bar's fields, the expert-load
line of every evaluation, where an offline wandb run went, and TensorBoard event files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from moe_lm.cli import main
from moe_lm.config import Config


def write(cfg: Config, path: Path) -> Path:
    path.write_text(cfg.to_yaml())
    return path


def records(run: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_progress_bar_shows_lr_and_grad_norm(make_config, tmp_path, capsys) -> None:
    cfg = make_config(train={"max_steps": 3}, logging={"progress_bar": True, "log_every": 1})
    assert main(["train", str(write(cfg, tmp_path / "c.yaml"))]) == 0
    out = capsys.readouterr().out
    last = records(cfg.output_dir, "train")[-1]
    assert f"lr={last['lr']:.2e}" in out and f"gnorm={last['grad_norm']:.3g}" in out
    assert f"loss={last['loss']:.3f}" in out and "tok/s=" in out


def test_every_evaluation_prints_one_expert_load_line(make_config, tmp_path, capsys) -> None:
    cfg = make_config(train={"max_steps": 4, "eval_every": 2})
    assert main(["train", str(write(cfg, tmp_path / "c.yaml"))]) == 0
    out = capsys.readouterr().out
    evals = records(cfg.output_dir, "eval")
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:
        # validation routing: each layer's shares sum to 1; max/mean = the largest share x E
        assert len(e["val_expert_load"]) == cfg.model.num_layers
        for row, ratio in zip(e["val_expert_load"], e["val_imbalance"]):
            assert sum(row) == pytest.approx(1.0, abs=1e-3)
            assert ratio == pytest.approx(max(row) * cfg.model.num_experts, abs=1e-3)
        per_layer = " ".join(f"{v:.2f}" for v in e["val_imbalance"])
        lines = [line for line in out.splitlines() if line.startswith(f"step {e['step']}: expert load")]
        worst = max(range(len(e["val_imbalance"])), key=lambda i: e["val_imbalance"][i])
        assert lines == [
            f"step {e['step']}: expert load max/mean per MoE layer: {per_layer} "
            f"(1.00 = balanced; worst: MoE layer {worst})"
        ]


def test_an_offline_wandb_run_says_where_it_is_and_how_to_upload_it(
    make_config, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no key, so offline
    cfg = make_config(train={"max_steps": 2}, logging={"wandb": True})
    assert main(["train", str(write(cfg, tmp_path / "c.yaml"))]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("wandb: the run was logged offline")]
    where = re.search(r"`wandb sync (.+)`$", line)
    assert where is not None
    run_dir = Path(where.group(1))
    assert (
        run_dir.parent == (cfg.output_dir / "wandb").resolve() or run_dir.parent == cfg.output_dir / "wandb"
    )
    assert run_dir.name.startswith("offline-run-") and any(run_dir.glob("*.wandb"))


def test_tensorboard_gets_every_record(make_config, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(train={"max_steps": 4, "eval_every": 2}, logging={"tensorboard": True, "log_every": 2})
    assert main(["train", str(write(cfg, tmp_path / "c.yaml"))]) == 0
    events = EventAccumulator(str(cfg.output_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    train = records(cfg.output_dir, "train")
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [r["step"] for r in train] == [1, 2, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/val_loss")] == [0, 2, 4]
    assert "expert_load/L0/E0" in tags["scalars"] and "imbalance/1" in tags["scalars"]
    assert [t for t in tags["tensors"] if t.startswith("sample/")] == ["sample/text/text_summary"]


def test_tensorboard_without_its_package_is_refused_before_anything(
    make_config, tmp_path, monkeypatch, capsys
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    cfg = make_config(logging={"tensorboard": True})
    capsys.readouterr()
    assert main(["train", str(write(cfg, tmp_path / "c.yaml"))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: logging.tensorboard needs the tensorboard package: pip install 'moe_lm[tensorboard]' "
        "(or set logging.tensorboard=false)"
    )
    assert not cfg.output_dir.exists()
