"""Mixtures end to end: `moe-lm data prepare`, training on weighted sources with document masking,
per-source tokens and validation sets in the metrics, exact resume, `moe-lm eval`, and the data
rows of the bad-input table (one line, exit 2, nothing prepared lost)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from moe_lm.cli import main
from tests.integration.conftest import run_config_dict
from tests.integration.test_bad_input import snapshot, write
from tests.integration.test_train import records


@pytest.fixture(scope="module")
def inputs(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture-inputs")
    text = corpus.read_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    (root / "notes.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in paragraphs[: len(paragraphs) // 2])
    )
    (root / "extra.txt").write_text(text[-20_000:])
    return {"book": corpus, "notes": root / "notes.jsonl", "extra": root / "extra.txt"}


def mixture_config(inputs: dict[str, Path], tokenizer_dir: Path, root: Path, name: str, **train: Any) -> Path:
    data = run_config_dict(
        inputs["book"],
        tokenizer_dir,
        root / name,
        train={"eval_every": 4, **train},
        logging={"peak_tflops": 1.0},
    )
    data["data"] = {
        "sources": {
            "book": {"files": [str(inputs["book"])], "weight": 3},
            "notes": {"files": [str(inputs["notes"])], "weight": 1, "val_fraction": 0.1},
        },
        "val_sources": {"extra": {"files": [str(inputs["extra"])]}},
        "tokenizer": str(tokenizer_dir),
        "seq_len": 32,
        "cache_dir": str(root / "cache"),
        "document_mask": True,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_prepare_then_train_a_mixture_with_per_source_metrics_and_exact_resume(
    inputs: dict[str, Path], tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    straight = mixture_config(inputs, tokenizer_dir, tmp_path, "straight", max_steps=8)
    assert main(["data", "prepare", str(straight)]) == 0
    table = capsys.readouterr().out
    for row in ("book", "notes", "extra", "validation", "train (val: last 0.1)"):
        assert row in table
    assert main(["train", str(straight)]) == 0
    assert "to tokenise" not in capsys.readouterr().out  # training found everything prepared
    run = tmp_path / "straight"
    recs = records(run)
    for r in recs:
        assert r["tokens/book"] + r["tokens/notes"] == r["tokens"]
    last = recs[-1]
    assert last["tokens/book"] > last["tokens/notes"] > 0
    evals = records(run, "eval")
    assert [e["step"] for e in evals] == [0, 4, 8]
    for e in evals:
        names = [k for k in e if k.startswith("val/") and k.endswith("/loss")]
        assert names == ["val/book/loss", "val/notes/loss", "val/extra/loss"]
        assert e["val_loss"] == pytest.approx(sum(e[n] for n in names) / 3)
        assert e["val/notes/ppl"] == pytest.approx(torch.tensor(e["val/notes/loss"]).exp().item(), rel=1e-6)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    split = mixture_config(inputs, tokenizer_dir, tmp_path, "split", max_steps=8, stop_at_step=4)
    assert main(["train", str(split)]) == 0
    assert main(["train", str(split), "train.resume=latest", "train.stop_at_step=null"]) == 0
    for a, b in zip(recs, records(tmp_path / "split"), strict=True):
        for key in ("loss", "lm_loss", "grad_norm", "tokens/book", "tokens/notes"):
            assert a[key] == b[key], (a["step"], key)

    capsys.readouterr()
    assert main(["eval", str(run), "--max-batches", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("val_loss ") and len(lines) == 4
    assert [line.split()[0] for line in lines[1:]] == ["val/book", "val/notes", "val/extra"]
    notes_loss = float(lines[2].split()[2])
    assert notes_loss == pytest.approx(evals[-1]["val/notes/loss"], abs=1e-3)  # same batches, same masking
    assert main(["eval", str(run), "--sets", "extra", "--max-batches", "2"]) == 0
    assert float(capsys.readouterr().out.split()[1]) == pytest.approx(evals[-1]["val/extra/loss"], abs=1e-3)


def _bad(tmp: Path, inputs: dict[str, Path], tokenizer_dir: Path) -> dict[str, tuple[list[str], list[str]]]:
    cfg = mixture_config(inputs, tokenizer_dir, tmp, "bad")
    (tmp / "empties").mkdir()
    for n in ("a.txt", "b.txt"):
        (tmp / "empties" / n).write_bytes(b"")
    return {
        "weight-zero": (
            ["train", str(cfg), "data.sources.notes.weight=0"],
            ["data.sources.notes.weight = 0.0 must be > 0"],
        ),
        "all-files-empty": (
            ["train", str(cfg), f"data.sources.notes.files=[{tmp / 'empties'}/*.txt]"],
            ["data.sources.notes.files: all 2 files are empty", "add text"],
        ),
        "source-yields-no-block": (
            [
                "train",
                str(cfg),
                "data.seq_len=64",
                "model.max_seq_len=64",
                f"data.sources.notes.files=[{write(tmp / 'tiny.txt', b'the king')}]",
            ],
            ["data.sources.notes.files yields", "fewer than one block of seq_len+1 = 65"],
        ),
        "unknown-dataset-offline": (
            [
                "data",
                "prepare",
                str(cfg),
                "data.sources.notes.files=[]",
                "data.sources.notes.dataset=nobody/nothing",
            ],
            ["data.sources.notes.dataset: cannot load dataset 'nobody/nothing'", "Hub is offline"],
        ),
        "damaged-shard": (
            ["train", str(cfg)],
            ["is damaged", "run `moe-lm data prepare CONFIG` to rebuild it"],
        ),
        "other-tokenizer": (
            ["train", str(cfg), "model.vocab_size=400", f"data.tokenizer={tmp / 'tok2'}"],
            ["was made by another tokenizer", "set data.cache_dir to a new directory"],
        ),
    }


@pytest.mark.parametrize(
    "row",
    [
        "weight-zero",
        "all-files-empty",
        "source-yields-no-block",
        "unknown-dataset-offline",
        "damaged-shard",
        "other-tokenizer",
    ],
)
def test_bad_data_is_one_line_exit_2_and_keeps_the_store(
    row: str, inputs: dict[str, Path], tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _bad(tmp_path, inputs, tokenizer_dir)
    assert main(["data", "prepare", str(tmp_path / "bad.yaml")]) == 0
    shards = tmp_path / "cache" / "store" / "shards"
    if row == "damaged-shard":
        ids = sorted(shards.glob("notes*.ids"))[0]
        ids.write_bytes(ids.read_bytes()[:-4])
    if row == "other-tokenizer":
        from moe_lm.data.tokenizer import train_tokenizer

        train_tokenizer([str(inputs["extra"])], 400, tmp_path / "tok2")
    before = snapshot(shards)
    capsys.readouterr()
    argv, expect = rows[row]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "skipped" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in expect:
        assert fragment in lines[0], (fragment, lines[0])
    after = snapshot(shards)
    assert {k: after.get(k) for k in before} == before  # nothing already prepared was lost or rewritten
    assert not (tmp_path / "bad").exists()  # caught before the run directory was written
