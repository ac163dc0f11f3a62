"""Loading a checkpoint never runs code, through `moe-lm train ... train.resume=DIR`.

Checkpoints are shared between teams, and the manifest checks integrity, not origin: anyone can
plant an object whose `__reduce__` runs a command and recompute the sha256. Today's checkpoints
hold no pickle at all; those of earlier versions (optimizer and per-rank state as `torch.save`
pickles) still resume, bit for bit, through the restricted unpickler, which refuses a planted
payload with one line, exit 2, before any of it runs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from moe_lm.cli import main
from moe_lm.state.manifest import write_manifest
from moe_lm.state.weights import load_model_state
from tests.integration.conftest import run_config_dict

STEPS = 4


@pytest.fixture(scope="module")
def make_run(corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("safe")

    def make(name: str, **train: Any) -> Path:
        data = run_config_dict(
            corpus,
            tokenizer_dir,
            root / name,
            train={"max_steps": STEPS, **train},
            checkpoint={"every": 2, "keep_last": 0},
            logging={"peak_tflops": 1.0},
        )
        data["data"]["cache_dir"] = str(root / "cache")
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


def run_dir(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["train"]["output_dir"])


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(make_run) -> Path:
    cfg = make_run("reference")
    assert main(["train", str(cfg)]) == 0
    return run_dir(cfg)


def to_legacy(ckpt: Path) -> None:
    """Rewrite a checkpoint as versions before safetensors state wrote it: optimizer and rank state
    as torch.save pickles (optim-ep0-of-1.pt, rank0.pt), and a per-rank loader position."""
    optim = ckpt / "optim-ep0-of-1.safetensors"
    if optim.is_file():
        named: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(str(optim), "pt") as f:
            meta = f.metadata()
            for key in f.keys():  # noqa: SIM118
                name, _, k = key.rpartition("/")
                named.setdefault(name, {})[k] = f.get_tensor(key)
        blob = {
            "optimizer": named,
            "scheduler": {"last_epoch": int(meta["scheduler_last_epoch"])},
            "expert_range": tuple(json.loads(meta["expert_range"])),
        }
        torch.save(blob, ckpt / "optim-ep0-of-1.pt")
        optim.unlink()
    position_file = ckpt / "data_position.json"
    if position_file.is_file():
        pos = json.loads(position_file.read_text())
        (source,) = pos["sources"]
        loader = {
            "epoch": pos["epoch"],
            "position": pos["epoch_samples"] // pos["global_batch"],
            "seed": pos["seed"],
            "num_blocks": source["num_blocks"],
            "micro_batch_size": pos["global_batch"],
            "dp_size": 1,
            "order": pos["order"],
            "sources": [[source["name"], source["weight"]]],
            "streams": {},
        }
        rng = load_file(str(ckpt / "rng-rank0.safetensors"))
        torch.save({"loader": loader, "rng": rng, "world_size": 1}, ckpt / "rank0.pt")
        position_file.unlink()
        (ckpt / "rng-rank0.safetensors").unlink()
    write_manifest(ckpt)


class Payload:
    """What an attacker plants: unpickling it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    blob = torch.load(path, weights_only=False)  # the test's own file, written just above
    blob["extra"] = Payload(marker)
    torch.save(blob, path)
    write_manifest(path.parent)  # the sha256 recomputed: the manifest checks integrity, not origin


def stopped_at_2(make_run, name: str) -> tuple[Path, Path]:
    cfg = make_run(name, stop_at_step=2)
    assert main(["train", str(cfg)]) == 0
    return cfg, run_dir(cfg) / "checkpoints" / "step-2"


def test_todays_checkpoint_holds_no_pickle(make_run, reference) -> None:
    ckpt = reference / "checkpoints" / f"step-{STEPS}"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == [
        "MANIFEST.json",
        "config.yaml",
        "data_position.json",
        "model-ep0-of-1.safetensors",
        "optim-ep0-of-1.safetensors",
        "rng-rank0.safetensors",
        "trainer_state.json",
    ]


def test_a_checkpoint_of_an_earlier_version_resumes_bit_identically(make_run, reference, capsys) -> None:
    cfg, ckpt = stopped_at_2(make_run, "legacy")
    to_legacy(ckpt)
    assert {p.name for p in ckpt.glob("*.pt")} == {"optim-ep0-of-1.pt", "rank0.pt"}
    assert main(["train", str(cfg), "train.resume=latest", "train.stop_at_step=null"]) == 0
    assert f"resumed from {ckpt} at step 2" in capsys.readouterr().out
    assert losses(run_dir(cfg)) == losses(reference)
    a = load_model_state(run_dir(cfg) / "checkpoints" / f"step-{STEPS}")
    b = load_model_state(reference / "checkpoints" / f"step-{STEPS}")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("victim", ["rank0.pt", "optim-ep0-of-1.pt"])
def test_a_planted_payload_is_refused_in_one_line_and_never_runs(make_run, tmp_path, capsys, victim) -> None:
    cfg, ckpt = stopped_at_2(make_run, f"planted-{victim}")
    to_legacy(ckpt)
    marker = tmp_path / "PWNED"
    plant(ckpt / victim, marker)
    before = {p.name: p.read_bytes() for p in run_dir(cfg).rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", str(cfg), f"train.resume={ckpt}", "train.stop_at_step=null"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()  # the command in the payload did not run
    assert err.count("\n") == 1 and err.startswith(f"error: checkpoint file {ckpt / victim} holds pickled ")
    assert "posix.system" in err and "it was not loaded" in err and "a source you trust" in err
    after = {p.name: p.read_bytes() for p in run_dir(cfg).rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing deleted


def test_a_pickle_planted_beside_todays_state_is_never_read(make_run, tmp_path, capsys) -> None:
    cfg, ckpt = stopped_at_2(make_run, "planted-beside")
    marker = tmp_path / "PWNED"
    torch.save({"extra": Payload(marker)}, ckpt / "rank0.pt")
    shutil.copy(ckpt / "rank0.pt", ckpt / "optim-ep0-of-1.pt")
    write_manifest(ckpt)
    assert main(["train", str(cfg), f"train.resume={ckpt}", "train.stop_at_step=null"]) == 0
    assert not marker.exists()
