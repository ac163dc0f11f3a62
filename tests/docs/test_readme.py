"""The README's path from a corpus to the Hub, run end to end at tiny size (tests/docs/commands.py):
the corpus is prepared, the run trains, resumes and continues, `moe-lm eval` reports what training's
evaluation did, transformers loads the export with moe_lm's logits, and `push --dry-run` lists it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.docs import shell
from tests.docs.commands import DocRun, scaled
from tests.docs.markdown import REPO, Command, steps

pytestmark = pytest.mark.slow
README = REPO / "README.md"


@pytest.fixture(scope="module")
def readme(doc_run: Callable[[Path], DocRun]) -> DocRun:
    return doc_run(README)


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_the_path_is_prepare_train_resume_eval_export_load_push_in_that_order() -> None:
    texts = [s.text for s in steps(README) if isinstance(s, Command)]
    path = [
        "moe-lm data prepare configs/my-model.yaml",
        "moe-lm train configs/my-model.yaml",
        "moe-lm train configs/my-model.yaml train.resume=latest",
        "moe-lm eval runs/my-model",
        "moe-lm export runs/my-model --out exports/my-model",
        "AutoModelForCausalLM.from_pretrained('exports/my-model')",
        "moe-lm push exports/my-model --repo-id you/my-model --dry-run",
        "moe-lm push exports/my-model --repo-id you/my-model --private",
    ]
    at = [next(i for i, t in enumerate(texts) if step in t) for step in path]
    assert at == sorted(at), list(zip(path, at))


def test_prepare_trains_the_tokenizer_and_tokenises_the_corpus(readme: DocRun) -> None:
    from moe_lm.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(readme.root / "tokenizers" / "my-model")
    assert tokenizer.vocab_size == 2048  # the YAML's model.vocab_size
    store = readme.root / ".cache" / "moe_lm" / "store"
    source = json.loads((store / "MANIFEST.json").read_text())["sources"]["data.train_files"]
    assert source["input"] == ["my-corpus/*.txt"]
    (shard,) = source["shards"]
    made = json.loads((store / "shards" / f"{shard}.json").read_text())
    assert made["input"]["path"] == str(readme.root / "my-corpus" / "tinyshakespeare.txt")
    assert made["tokenizer"] == tokenizer.fingerprint and made["tokens"] == source["tokens"] > 0


def test_the_run_trains_then_resumes_where_it_stopped(readme: DocRun) -> None:
    run = readme.root / "runs" / "my-model"
    # The YAML's 800 steps and the resume's max_steps=1200, scaled by the tests' rules.
    first, total = scaled(800), scaled(1200)
    assert [r["step"] for r in _records(run, "train")] == list(range(1, total + 1))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{total}"
    resumed = readme.output_of("train.resume=latest")
    assert f"resumed from {run.relative_to(readme.root)}/checkpoints/step-{first}" in resumed.replace(
        "\\", "/"
    )


def test_eval_reports_what_training_evaluated_last(readme: DocRun) -> None:
    final = _records(readme.root / "runs" / "my-model", "eval")[-1]
    out = readme.output_of("moe-lm eval runs/my-model")
    assert f"val_loss {final['val_loss']:.4f}" in out


def test_transformers_loads_the_export_with_moe_lms_logits(readme: DocRun) -> None:
    from transformers import AutoModelForCausalLM

    from moe_lm.state.weights import load_pretrained

    assert readme.output_of("from_pretrained('exports/my-model')").strip().endswith("MixtralForCausalLM")
    hf = AutoModelForCausalLM.from_pretrained(readme.root / "exports" / "my-model").eval()
    cfg, ours = load_pretrained(str(readme.root / "runs" / "my-model"), "cpu")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours.eval()(ids).logits
    assert (theirs - mine).abs().max().item() < 1e-5


def test_push_dry_run_lists_the_export_and_sends_nothing(readme: DocRun) -> None:
    out = readme.output_of("--dry-run")
    assert "would push exports/my-model to you/my-model" in out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= listed
    assert out.rstrip().endswith("nothing was sent")


def test_bare_moe_lm_and_python_come_after_activating_the_venv() -> None:
    # A fresh clone after `make train` has moe-lm and its python only in .venv/bin: the README's
    # commands spell them `.venv/bin/...` until it has the reader run `source .venv/bin/activate`.
    activated, bare = False, []
    for step in steps(README):
        if not isinstance(step, Command):
            continue
        for simple in shell.simple_commands(shell.parse(step.text)):
            words = simple.words.split()
            if words[:2] in (["source", ".venv/bin/activate"], [".", ".venv/bin/activate"]):
                activated = True
            elif words and words[0] in ("moe-lm", "python", "python3") and not activated:
                bare.append(f"{step.where}: {words[0]}")
    assert bare == []
