"""The bad-input table: each row is one line on stderr naming the culprit and the fix, exit code 2,
and nothing in the run directory touched (files and mtimes compared before and after).

Most rows run against a copy of a finished run, resuming it (with more steps: a finished run resumed
as it is has nothing to do) or overwriting it where that makes the row most dangerous: bad input
must be caught before the first write.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moe_lm.cli import main
from tests.integration.conftest import run_config_dict


@dataclass
class Ctx:
    tmp: Path
    run: Path  # a copy of a finished 2-step run (checkpoint step-2)
    cfg: Path  # its config, output_dir pointing at the copy
    monkeypatch: pytest.MonkeyPatch


@pytest.fixture(scope="module")
def finished_run(
    corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bad-input")
    data = run_config_dict(
        corpus,
        tokenizer_dir,
        root / "run",
        train={"max_steps": 2},
        checkpoint={"every": 2, "keep_last": 2},
        logging={"peak_tflops": 1.0},
    )
    data["data"]["cache_dir"] = str(root / "cache")
    (root / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["train", str(root / "c.yaml")]) == 0
    return data


@pytest.fixture
def ctx(finished_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    run = tmp_path / "run"
    shutil.copytree(finished_run["train"]["output_dir"], run)
    data = {**finished_run, "train": {**finished_run["train"], "output_dir": str(run)}}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return Ctx(tmp_path, run, cfg, monkeypatch)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
    }


UTF16 = "ROMEO: wherefore\n".encode("utf-16")  # text, but not UTF-8 (NUL bytes too)


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def no_token(c: Ctx) -> Path:
    """An exported folder, and no Hugging Face token anywhere: HF_TOKEN unset, HOME and HF_HOME empty."""
    import huggingface_hub.constants as hf_constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        c.monkeypatch.delenv(var, raising=False)
    home = c.tmp / "home"
    home.mkdir()
    c.monkeypatch.setenv("HOME", str(home))
    c.monkeypatch.setenv("HF_HOME", str(home / ".cache" / "huggingface"))
    c.monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / ".cache" / "huggingface" / "token"))
    folder = c.tmp / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def train(c: Ctx, *overrides: str) -> tuple[list[str], Path]:
    return ["train", str(c.cfg), *overrides], c.run


def resume_not_a_checkpoint(c: Ctx) -> tuple[list[str], Path]:
    (c.tmp / "empty").mkdir()
    return train(c, f"train.resume={c.tmp / 'empty'}")


def resume_nothing_saved(c: Ctx) -> tuple[list[str], Path]:
    return [
        "train",
        str(c.cfg),
        "train.resume=latest",
        f"train.output_dir={c.tmp / 'fresh'}",
    ], c.tmp / "fresh"


def disk_full(c: Ctx) -> tuple[list[str], Path]:
    """Resume the 2-step run to step 4; the write of checkpoint step-4 hits a full disk (injected)."""
    c.monkeypatch.setenv("MOE_LM_FAULT", "enospc:4")
    return train(c, "train.resume=latest", "train.max_steps=4")[0], c.run / "checkpoints"


def push_at_end_offline(c: Ctx) -> tuple[list[str], Path]:
    """A token, but the Hub offline (as make used to force): refused before step 1, not after training."""
    import huggingface_hub.constants as hf_constants

    c.monkeypatch.setenv("HF_TOKEN", "hf_some_token")
    c.monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return train(c, "train.overwrite=true", "hub.push_at_end=true", "hub.repo_id=alice/tiny")


def tensorboard_missing(c: Ctx) -> tuple[list[str], Path]:
    import importlib.util

    real = importlib.util.find_spec
    c.monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    return train(c, "train.overwrite=true", "logging.tensorboard=true")


def damage(c: Ctx, edit: Callable[[Path], object], *overrides: str) -> tuple[list[str], Path]:
    """Edit the copy's checkpoint step-2 and rewrite its manifest, as a hostile or careless editor
    would (the manifest checks integrity, not origin); then resume it to step 4."""
    from moe_lm.state.manifest import MANIFEST, write_manifest

    step = c.run / "checkpoints" / "step-2"
    edit(step)
    (step / MANIFEST).unlink()
    write_manifest(step)
    return train(c, "train.resume=latest", "train.max_steps=4", *overrides)


def edit_json(name: str, change: Callable[[Any], object]) -> Callable[[Path], object]:
    def edit(step: Path) -> None:
        data = json.loads((step / name).read_text())
        change(data)
        (step / name).write_text(json.dumps(data))

    return edit


def edit_tensors(name: str, change: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], object]:
    def edit(step: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(step / name), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(step / name))
        change(tensors)
        save_file(tensors, str(step / name), metadata=metadata)

    return edit


def first_moment(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if k.endswith("/exp_avg"))


DAMAGED = "resume from another step (train.resume=PATH/step-N)"


def read_only_output_dir(c: Ctx) -> tuple[list[str], Path]:
    """A read-only directory, as a user (not root, whom permissions do not stop) meets it."""
    import os

    ro = c.tmp / "read-only"
    ro.mkdir()
    real = os.access
    c.monkeypatch.setattr(os, "access", lambda p, mode, **kw: str(p) != str(ro) and real(p, mode, **kw))
    return train(c, f"train.output_dir={ro / 'run'}")[0], ro


def hub_push(c: Ctx) -> tuple[list[str], Path]:
    return ["push", str(no_token(c)), "--repo-id", "a/b"], c.tmp / "export"


# (id, ctx -> (argv, the directory that must stay untouched), fragments of the one error line)
ROWS: list[tuple[str, Callable[[Ctx], tuple[list[str], Path]], list[str]]] = [
    (
        "unknown-key",
        lambda c: train(c, "train.resume=latest", "model.num_expert=8"),
        ["unknown config key 'model.num_expert'", "did you mean 'model.num_experts'?"],
    ),
    (
        "unknown-section-in-yaml",
        lambda c: (
            ["train", write(c.tmp / "typo.yaml", c.cfg.read_bytes().replace(b"optim:", b"optimizer:"))],
            c.run,
        ),
        ["unknown config key 'optimizer'", "did you mean 'optim'?"],
    ),
    (
        "wrong-type-int",
        lambda c: train(c, "train.resume=latest", "train.max_steps=many"),
        ["train.max_steps: expected an integer, got 'many'"],
    ),
    (
        "wrong-type-bool",
        lambda c: train(c, "train.overwrite=maybe"),
        ["train.overwrite: expected true or false"],
    ),
    (
        "shape-top-k",
        lambda c: train(c, "train.overwrite=true", "model.top_k=8"),
        ["model.top_k = 8 exceeds model.num_experts = 4", "lower top_k"],
    ),
    (
        "shape-heads",
        lambda c: train(c, "train.overwrite=true", "model.num_heads=5"),
        ["model.num_heads = 5 does not divide model.hidden_size = 48", "set model.head_dim"],
    ),
    (
        "shape-ep-size",
        lambda c: train(c, "train.overwrite=true", "parallel.ep_size=3"),
        [
            "model.num_experts = 4 is not divisible by parallel.ep_size = 3",
            "choose an ep_size that divides it",
        ],
    ),
    (
        "checkpoint-without-data-position",
        lambda c: damage(c, lambda step: (step / "data_position.json").unlink()),
        [
            "has no data_position.json",
            "would re-train from the first samples",
            "train.accept_changed_data=true",
        ],
    ),
    (
        "data-position-negative",
        lambda c: damage(
            c, edit_json("data_position.json", lambda p: p.update(epoch_samples=-8, samples=-8))
        ),
        ["data_position.json is damaged: epoch_samples is -8, not a count", DAMAGED],
    ),
    (
        "data-position-text-count",
        lambda c: damage(c, edit_json("data_position.json", lambda p: p.update(epoch_samples="8"))),
        ["data_position.json is damaged: epoch_samples is '8', not a count", DAMAGED],
    ),
    (
        "data-position-list",
        lambda c: damage(c, lambda step: (step / "data_position.json").write_text("[1, 2]")),
        ["data_position.json is damaged: it holds a list, not an object", DAMAGED],
    ),
    (
        "data-position-other-source",
        lambda c: damage(c, edit_json("data_position.json", lambda p: p["sources"][0].update(name="web"))),
        [
            "source 'web' holds the same tokens as this run's 'corpus'",
            "name it 'web' again",
            "train.accept_changed_data=true",
        ],
    ),
    (
        "optimizer-state-wrong-shape",
        lambda c: damage(
            c,
            edit_tensors(
                "optim-ep0-of-1.safetensors", lambda t: t.update({first_moment(t): torch.zeros(3, 5)})
            ),
        ),
        [
            "optim-ep0-of-1.safetensors' does not fit this model",
            "has shape (3, 5) but the parameter has",
            DAMAGED,
        ],
    ),
    (
        "optimizer-state-wrong-dtype",
        lambda c: damage(
            c,
            edit_tensors(
                "optim-ep0-of-1.safetensors", lambda t: t.update({first_moment(t): t[first_moment(t)].long()})
            ),
        ),
        [
            "optim-ep0-of-1.safetensors' does not fit this model",
            "dtype torch.int64, not a floating point",
            DAMAGED,
        ],
    ),
    (
        "optimizer-state-unknown-parameter",
        lambda c: damage(
            c,
            edit_tensors(
                "optim-ep0-of-1.safetensors",
                lambda t: t.update({"nonsense/exp_avg": t[first_moment(t)].clone()}),
            ),
        ),
        ["'nonsense' is not a parameter of this model", DAMAGED],
    ),
    (
        "optimizer-state-missing-moment",
        lambda c: damage(c, edit_tensors("optim-ep0-of-1.safetensors", lambda t: t.pop(first_moment(t)))),
        ["the optimizer keeps ['exp_avg', 'exp_avg_sq', 'step']", DAMAGED],
    ),
    (
        "weights-wrong-shape",
        lambda c: damage(
            c,
            edit_tensors(
                "model-ep0-of-1.safetensors", lambda t: t.update({"embed.weight": torch.zeros(2, 2)})
            ),
        ),
        ["do not fit this model: 'embed.weight' has shape (2, 2) but the model needs (384, 48)", DAMAGED],
    ),
    (
        "weights-integer",
        lambda c: damage(
            c,
            edit_tensors(
                "model-ep0-of-1.safetensors", lambda t: t.update({"embed.weight": t["embed.weight"].int()})
            ),
        ),
        ["'embed.weight' has dtype torch.int32, the model needs torch.float32", DAMAGED],
    ),
    (
        "rng-wrong-size",
        lambda c: damage(
            c,
            edit_tensors(
                "rng-rank0.safetensors", lambda t: t.update(torch=torch.zeros(7, dtype=torch.uint8))
            ),
        ),
        ["rng-rank0.safetensors is damaged: 'torch' is not a generator state", DAMAGED],
    ),
    (
        "rng-no-torch-state",
        lambda c: damage(c, edit_tensors("rng-rank0.safetensors", lambda t: t.update(other=t.pop("torch")))),
        ["rng-rank0.safetensors is damaged: it holds ['other']", DAMAGED],
    ),
    (
        "trainer-state-junk",
        lambda c: damage(c, lambda step: (step / "trainer_state.json").write_text("{junk")),
        ["trainer_state.json is damaged: it is not readable JSON", DAMAGED],
    ),
    (
        "trainer-state-no-step",
        lambda c: damage(c, edit_json("trainer_state.json", lambda t: t.pop("step"))),
        ["trainer_state.json is damaged: step is None, not a count", DAMAGED],
    ),
    (
        "output-dir-under-a-file",
        lambda c: train(c, f"train.output_dir={write(c.tmp / 'afile', b'x')}/run"),
        ["train.output_dir", "afile/run cannot be made:", "afile is a file; choose another train.output_dir"],
    ),
    (
        "output-dir-read-only",
        read_only_output_dir,
        ["read-only/run is not writable", "permission denied or a read-only filesystem", "make it writable"],
    ),
    (
        "data-missing",
        lambda c: train(
            c, "train.resume=latest", "train.max_steps=4", f"data.train_files=[{c.tmp}/nope.txt]"
        ),
        ["data.train_files: file", "nope.txt' not found", "check the path"],
    ),
    (
        "data-empty",
        lambda c: train(c, "train.overwrite=true", f"data.train_files=[{write(c.tmp / 'e.txt', b'')}]"),
        ["data.train_files:", "e.txt' is empty", "remove it from data.train_files or add text"],
    ),
    (
        "data-binary",
        lambda c: train(
            c,
            "train.resume=latest",
            "train.max_steps=4",
            f"data.train_files=[{write(c.tmp / 'b.txt', bytes(range(256)) * 64)}]",
        ),
        ["data.train_files:", "b.txt' is binary (NUL bytes)", "list only UTF-8 text files"],
    ),
    (
        "vocab-mismatch",
        lambda c: train(c, "train.overwrite=true", "model.vocab_size=256"),
        ["has 384 tokens but model.vocab_size = 256", "set model.vocab_size=384 or retrain the tokenizer"],
    ),
    (
        "resume-other-shape",
        lambda c: train(c, "train.resume=latest", "model.hidden_size=64"),
        ["has model.hidden_size = 48 but the config says 64", "restore model.hidden_size or start a new run"],
    ),
    (
        "resume-not-a-checkpoint",
        resume_not_a_checkpoint,
        [
            "empty: that directory holds no checkpoint",
            "use latest, a run directory or a RUN/checkpoints/step-N",
        ],
    ),
    (
        "resume-nothing-saved",
        resume_nothing_saved,
        [
            "train.resume=latest but",
            "fresh/checkpoints holds no complete checkpoint",
            "start without train.resume",
        ],
    ),
    (
        "output-dir-holds-a-run",
        lambda c: train(c),
        ["already holds a run", "resume it with train.resume=latest", "replace it with train.overwrite=true"],
    ),
    (
        "disk-full",
        disk_full,
        [
            "disk full: cannot write checkpoint step-4 to",
            "it needs ",
            "bytes) are free",
            "nothing of step-4 was kept and checkpoint step-2 is intact",
            "free space",
            "continue with train.resume=auto",
        ],
    ),
    (
        "override-syntax",
        lambda c: train(c, "train.resume=latest", "train.max_steps"),
        ["override 'train.max_steps' is not of the form key.sub=value"],
    ),
    (
        "config-file-missing",
        lambda c: (["train", str(c.tmp / "nope.yaml")], c.run),
        ["config file", "nope.yaml' not found", "pass a YAML file"],
    ),
    (
        "config-not-yaml",
        lambda c: (["train", write(c.tmp / "bad.yaml", b"model: [1,\n")], c.run),
        ["is not valid YAML: the '[' at line 1, column 8 is never closed (the file ends)", "fix the syntax"],
    ),
    (
        "config-yaml-unclosed-mapping",
        lambda c: (
            ["train", write(c.tmp / "bad.yaml", b"name: x\ntrain: {max_steps: 3\nmodel: {}\n")],
            c.run,
        ),
        ["the '{' at line 2, column 8 is never closed", "but got ':' at line 3"],
    ),
    (
        "resume-shorter-than-checkpoint",
        lambda c: train(c, "train.resume=latest", "train.max_steps=1"),
        ["train.max_steps = 1 is below the step of checkpoint", "(2)", "raise train.max_steps above 2"],
    ),
    (
        "data-unknown-extension-not-text",
        lambda c: train(
            c,
            "train.resume=latest",
            "train.max_steps=4",
            f"data.train_files=[{write(c.tmp / 'x.bin', UTF16)}]",
        ),
        ["data.train_files:", "x.bin' has an extension", "is not UTF-8 text", "set data.format"],
    ),
    (
        "unknown-command",
        lambda c: (["trian", str(c.cfg)], c.run),
        ["unknown command 'trian'", "moe-lm --help"],
    ),
    ("unknown-flag", lambda c: train(c, "--max-steps", "3"), ["unrecognized arguments: --max-steps 3"]),
    ("hub-push-without-token", hub_push, ["no Hugging Face token", "set HF_TOKEN or run `hf auth login`"]),
    ("hub-push-at-end-offline", push_at_end_offline, ["offline mode is on", "set HF_HUB_OFFLINE=0"]),
    ("tensorboard-missing", tensorboard_missing, ["logging.tensorboard needs the tensorboard package"]),
]


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse exits by itself
        return int(e.code or 0)


@pytest.mark.parametrize(("name", "build", "expect"), [pytest.param(*row, id=row[0]) for row in ROWS])
def test_bad_input_is_one_clear_line_exit_2_and_touches_nothing(ctx, capsys, name, build, expect):
    argv, watched = build(ctx)
    before, run_before = snapshot(watched), snapshot(ctx.run / "checkpoints")
    capsys.readouterr()
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in expect:
        assert fragment in lines[0], (fragment, lines[0])
    assert snapshot(watched) == before
    assert snapshot(ctx.run / "checkpoints") == run_before  # the earlier run's checkpoints, always
