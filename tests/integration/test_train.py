"""End-to-end training through `moe-lm train` in-process: metrics, exact resume, freezing, init_from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moe_lm.cli import main
from moe_lm.config import Config
from moe_lm.state.weights import load_model_state

TRAIN_FIELDS = {
    "step",
    "tokens",
    "loss",
    "lm_loss",
    "aux_loss",
    "hf_aux_loss",
    "z_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "expert_load",
    "imbalance",
    "dropped_frac",
}


def write(cfg: Config, path: Path) -> Path:
    path.write_text(cfg.to_yaml())
    return path


def records(run: Path, kind: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train(cfg_path: Path, *overrides: str) -> int:
    return main(["train", str(cfg_path), *overrides])


def test_trains_logs_every_field_and_checkpoints(make_config, tmp_path):
    cfg = make_config(
        train={"max_steps": 30, "eval_every": 15},
        checkpoint={"every": 10, "keep_last": 2},
        logging={"log_every": 5},
    )
    assert train(write(cfg, tmp_path / "c.yaml")) == 0
    run = cfg.output_dir
    train_recs = records(run)
    assert [r["step"] for r in train_recs] == [1, 5, 10, 15, 20, 25, 30]
    for r in train_recs:
        assert r.keys() >= TRAIN_FIELDS
        assert len(r["expert_load"]) == cfg.model.num_layers
        for row in r["expert_load"]:
            assert len(row) == cfg.model.num_experts
            assert sum(row) == pytest.approx(1.0, abs=1e-3)
        # max over mean load per layer: the largest load fraction × E (both logged rounded: 5 and 4 digits)
        want = [max(row) * cfg.model.num_experts for row in r["expert_load"]]
        assert r["imbalance"] == pytest.approx(want, abs=1e-4)
        assert r["dropped_frac"] == 0.0  # dropless by default
        assert r["tokens"] == r["step"] * 4 * 32
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.5
    evals = records(run, "eval")
    assert [e["step"] for e in evals] == [0, 15, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(torch.tensor(evals[-1]["val_loss"]).exp().item(), rel=1e-6)
    assert records(run, "sample")[-1]["text"]
    # keep_last=2: step-30 and step-20 remain; latest points at step-30
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == ["step-20", "step-30"]
    assert (run / "checkpoints" / "latest").read_text() == "step-30"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["num_experts"] == cfg.model.num_experts


def test_resume_is_bit_identical(make_config, tmp_path):
    straight = make_config("straight", train={"max_steps": 8})
    assert train(write(straight, tmp_path / "a.yaml")) == 0

    split = make_config("split", train={"max_steps": 8, "stop_at_step": 4})
    cfg_path = write(split, tmp_path / "b.yaml")
    assert train(cfg_path) == 0
    assert (split.output_dir / "checkpoints" / "latest").read_text() == "step-4"
    assert train(cfg_path, "train.resume=latest", "train.stop_at_step=null") == 0

    a, b = records(straight.output_dir), records(split.output_dir)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "expert_load"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa = load_model_state(straight.output_dir / "checkpoints" / "step-8")
    wb = load_model_state(split.output_dir / "checkpoints" / "step-8")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_is_bit_identical_with_jitter_capacity_eval_and_samples(make_config, tmp_path):
    # Router jitter draws from the training RNG; evaluation, sampling and the MFU peak probe run
    # between steps and must not move it, or the resumed run routes differently.
    sections = dict(
        model={"router_jitter": 0.1, "capacity_factor": 1.0},
        train={"max_steps": 6, "eval_every": 2, "sample_every": 2},
    )
    straight = make_config("straight", **sections)
    assert train(write(straight, tmp_path / "a.yaml")) == 0
    split = make_config("split", **sections)
    cfg_path = write(split, tmp_path / "b.yaml")
    assert train(cfg_path, "train.stop_at_step=3") == 0
    assert train(cfg_path, "train.resume=latest") == 0

    a, b = records(straight.output_dir), records(split.output_dir)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert any(r["dropped_frac"] > 0 for r in a)  # capacity is really dropping
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "expert_load", "dropped_frac"):
            assert ra[key] == rb[key], (ra["step"], key)
    for kind, key in (("eval", "val_loss"), ("sample", "text")):
        got = {r["step"]: r[key] for r in records(split.output_dir, kind)}
        assert got == {r["step"]: r[key] for r in records(straight.output_dir, kind)}, kind
    wa = load_model_state(straight.output_dir / "checkpoints" / "step-6")
    wb = load_model_state(split.output_dir / "checkpoints" / "step-6")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_freeze_non_expert_trains_only_experts(make_config, tmp_path):
    base = make_config("base", train={"max_steps": 2})
    assert train(write(base, tmp_path / "base.yaml")) == 0
    frozen = make_config(
        "frozen", train={"max_steps": 3, "freeze": "non_expert", "init_from": str(base.output_dir)}
    )
    assert train(write(frozen, tmp_path / "f.yaml")) == 0
    before = load_model_state(base.output_dir / "checkpoints" / "step-2")
    after = load_model_state(frozen.output_dir / "checkpoints" / "step-3")
    for key in before:
        same = torch.equal(before[key], after[key])
        assert same != (".ffn.experts." in key), key
    # init_from starts a new run: its step counter starts at 0
    assert records(frozen.output_dir)[0]["step"] == 1


def test_eval_and_generate_commands(make_config, tmp_path, capsys):
    cfg = make_config(train={"max_steps": 4})
    assert train(write(cfg, tmp_path / "c.yaml")) == 0
    capsys.readouterr()
    assert main(["eval", str(cfg.output_dir), "--max-batches", str(cfg.train.eval_batches)]) == 0
    line = capsys.readouterr().out.strip()
    loss = float(line.split()[1])
    ppl = float(line.split()[3])
    assert ppl == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-3)
    last_eval = records(cfg.output_dir, "eval")[-1]
    assert loss == pytest.approx(last_eval["val_loss"], abs=1e-3)  # the same batches the trainer evaluated
    # --data evaluates other files: text unlike the training corpus scores worse than its val split
    other = tmp_path / "other.txt"
    other.write_text("".join(f"{i * 7919 % 10007} zq xv {i}\n" for i in range(400)))
    assert main(["eval", str(cfg.output_dir), "--data", str(other)]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1].split()[1]) > loss + 0.1
    assert (
        main(["generate", str(cfg.output_dir), "--prompt", "KING", "--max-new-tokens", "12", "--seed", "3"])
        == 0
    )
    first = capsys.readouterr().out
    assert first.startswith("KING") and len(first) > len("KING")
    assert (
        main(["generate", str(cfg.output_dir), "--prompt", "KING", "--max-new-tokens", "12", "--seed", "3"])
        == 0
    )
    assert capsys.readouterr().out == first


def test_wandb_offline_run_finishes(make_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no key, so offline
    cfg = make_config(train={"max_steps": 3}, logging={"wandb": True})
    assert train(write(cfg, tmp_path / "c.yaml")) == 0
    runs = list((cfg.output_dir / "wandb").glob("offline-run-*"))
    assert runs, "wandb wrote no offline run"
    assert any(runs[0].rglob("*.wandb"))


def test_train_prints_config_warnings_once_before_step_1(make_config, tmp_path, capsys, monkeypatch):
    from moe_lm.train.trainer import Trainer

    # What stderr held when the first step started, read at that moment: the order, recorded.
    before_step_1: list[str] = []
    real_step = Trainer.train_step

    def first_reads_stderr(self: Trainer) -> Any:
        if not before_step_1:
            before_step_1.append(capsys.readouterr().err)
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", first_reads_stderr)
    cfg = make_config(train={"max_steps": 2}, optim={"warmup_steps": 5})
    assert train(write(cfg, tmp_path / "c.yaml")) == 0
    warning = "warning: optim.warmup_steps = 5 ≥ train.max_steps = 2"
    assert len(before_step_1) == 1 and before_step_1[0].count(warning) == 1
    assert warning not in capsys.readouterr().err


def test_logged_losses_of_unpacked_micro_batches_are_their_means_divided_by_accum(
    make_config, tmp_path, monkeypatch
):
    # Each micro-batch's term is divided by grad_accum_steps, as before packed rows weighed theirs by
    # routed tokens: x * (1/3) differs from x / 3 in the last bit, and a run's logged losses would
    # no longer match what the same run logged before (or its own earlier checkpoints' records).
    from moe_lm.model.transformer import MoETransformer

    seen: list[Any] = []
    real_forward = MoETransformer.forward

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = real_forward(self, *args, **kwargs)
        if self.training and kwargs.get("labels") is not None:
            seen.append(out)
        return out

    monkeypatch.setattr(MoETransformer, "forward", recording)
    cfg = make_config(train={"max_steps": 2, "grad_accum_steps": 3}, logging={"log_every": 1})
    assert train(write(cfg, tmp_path / "c.yaml")) == 0
    recs = records(cfg.output_dir)
    assert len(seen) == 6
    for step, rec in enumerate(recs):
        outs = seen[3 * step : 3 * step + 3]
        for key in ("loss", "aux_loss", "z_loss"):
            want = sum(getattr(out, key).detach().float() / 3 for out in outs)
            assert rec[key] == float(want), (rec["step"], key)


def test_a_failed_run_is_recorded_by_wandb_as_failed_with_its_exit_code(make_config, tmp_path, monkeypatch):
    """Was: the trainer finishes wandb's run when the run fails (so its records are written before the
    other processes end), without an exit code: wandb recorded the failed run with 0 ("finished")."""
    import wandb

    finished: list[int | None] = []

    class FakeRun:
        offline, sync_dir = False, None

        def log(self, data: dict[str, Any], step: int) -> None:
            pass

        def finish(self, exit_code: int | None = None) -> None:
            finished.append(exit_code)

    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun())
    monkeypatch.setenv("MOE_LM_FAULT", "enospc_metrics:2")  # a full disk at step 2: exit code 2
    cfg = make_config(train={"max_steps": 3}, logging={"wandb": True})
    assert main(["train", str(write(cfg, tmp_path / "c.yaml"))]) == 2
    assert finished == [2]
