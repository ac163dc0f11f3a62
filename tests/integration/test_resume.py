"""Resuming with another train.max_steps, and `train.resume=auto` (one command for start and requeue).

A requeued job re-runs the exact command line it was submitted with, so `train.resume=auto` must
start fresh in an empty directory, continue from the newest checkpoint, restart a run killed
before its first checkpoint, and leave a finished run alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lm.cli import main
from moe_lm.config import Config


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
    }


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def write(cfg: Config, path: Path) -> Path:
    path.write_text(cfg.to_yaml())
    return path


def test_resuming_a_finished_run_does_nothing_and_says_so(make_config, tmp_path, capsys):
    """Before: eval and sample ran again, their records were appended twice and config.yaml rewritten."""
    cfg = make_config(train={"max_steps": 4, "eval_every": 2})
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    before = snapshot(cfg.output_dir)
    capsys.readouterr()
    for resume in ("latest", "auto"):
        assert main(["train", str(path), f"train.resume={resume}"]) == 0
        out = capsys.readouterr().out
        assert "training already finished at step 4" in out and "nothing to do" in out
    assert snapshot(cfg.output_dir) == before


def test_extending_a_finished_run_trains_on_and_warns_about_the_schedule(make_config, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 4}, optim={"warmup_steps": 1})
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "train.resume=latest", "train.max_steps=8"]) == 0
    out, err = capsys.readouterr()
    assert "resumed from" in out and "at step 4" in out
    # cosine to max_steps=4 had reached the floor (0.1 x lr); stretched to 8 it is back halfway
    assert "warning: train.max_steps 4 -> 8 extends the run and its learning-rate schedule" in err
    assert "at step 4 the lr moves from 0.0003 to 0.00" in err
    assert [r["step"] for r in records(cfg.output_dir, "train")] == list(range(1, 9))  # each step once
    assert [r["step"] for r in records(cfg.output_dir, "eval")] == [4, 8]
    assert [r["step"] for r in records(cfg.output_dir, "sample")] == [4, 8]
    assert (cfg.output_dir / "checkpoints" / "latest").read_text() == "step-8"


def test_shortening_to_a_step_still_ahead_continues_there(make_config, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 8, "stop_at_step": 3}, optim={"warmup_steps": 1})
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert (
        main(["train", str(path), "train.resume=auto", "train.stop_at_step=null", "train.max_steps=5"]) == 0
    )
    assert "8 -> 5 shortens the run" in capsys.readouterr().err
    assert [r["step"] for r in records(cfg.output_dir, "train")] == [1, 2, 3, 4, 5]


def test_auto_starts_fresh_then_continues(make_config, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 6, "stop_at_step": 2, "resume": "auto"})
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0  # nothing there: a new run
    assert "train.resume=auto: no checkpoint in" in capsys.readouterr().out
    assert main(["train", str(path), "train.stop_at_step=4"]) == 0  # the same command, later
    assert "at step 2" in capsys.readouterr().out
    assert main(["train", str(path), "train.stop_at_step=null"]) == 0
    assert [r["step"] for r in records(cfg.output_dir, "train")] == list(range(1, 7))


def test_auto_restarts_a_run_killed_before_its_first_checkpoint(make_config, tmp_path, capsys):
    """What a kill before the first checkpoint leaves: config.yaml, some metrics, a temp checkpoint dir.
    Plain `train` refuses that directory and `resume=latest` finds nothing; auto starts over."""
    cfg = make_config(train={"max_steps": 3})
    run = cfg.output_dir
    (run / "checkpoints" / ".tmp-step-2").mkdir(parents=True)
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 99.0}) + "\n")
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 2
    assert main(["train", str(path), "train.resume=latest"]) == 2
    capsys.readouterr()
    assert main(["train", str(path), "train.resume=auto"]) == 0
    assert "replacing what an earlier start left there" in capsys.readouterr().out
    steps = [r["step"] for r in records(run, "train")]
    assert steps == [1, 2, 3] and records(run, "train")[0]["loss"] != 99.0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-3"]


@pytest.mark.parametrize("resume", ["latest", "auto"])
def test_auto_never_deletes_damaged_checkpoints(make_config, tmp_path, capsys, resume):
    cfg = make_config(train={"max_steps": 2})
    path = write(cfg, tmp_path / "c.yaml")
    assert main(["train", str(path)]) == 0
    weights = next((cfg.output_dir / "checkpoints" / "step-2").glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    before = snapshot(cfg.output_dir)
    capsys.readouterr()
    assert main(["train", str(path), f"train.resume={resume}", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "every checkpoint in" in err and "nothing was deleted" in err
    assert snapshot(cfg.output_dir) == before


def test_auto_with_init_from_starts_from_the_weights_then_resumes_its_own_run(make_config, tmp_path, capsys):
    """A preemptible fine-tuning job: init_from on the first start only (the two were exclusive)."""
    import torch

    from moe_lm.state.weights import load_model_state

    base = make_config("base", train={"max_steps": 2})
    assert main(["train", str(write(base, tmp_path / "base.yaml"))]) == 0
    init = base.output_dir / "checkpoints" / "step-2"
    tune = make_config(
        "tune", train={"max_steps": 4, "stop_at_step": 2, "resume": "auto", "init_from": str(init)}
    )
    path = write(tune, tmp_path / "tune.yaml")
    assert main(["train", str(path)]) == 0
    first = records(tune.output_dir, "train")
    assert [r["step"] for r in first] == [1, 2]  # a new run: steps count from 0
    # same seed and data: only the init weights can make step 1 differ from a fresh start's
    assert first[0]["loss"] != records(base.output_dir, "train")[0]["loss"]
    init.rename(init.parent / "moved")  # a requeue must not need the init checkpoint any more
    capsys.readouterr()
    assert main(["train", str(path), "train.stop_at_step=null"]) == 0
    assert "at step 2" in capsys.readouterr().out
    assert [r["step"] for r in records(tune.output_dir, "train")] == [1, 2, 3, 4]
    weights = load_model_state(tune.output_dir / "checkpoints" / "step-4")
    assert all(torch.isfinite(w).all() for w in weights.values())
