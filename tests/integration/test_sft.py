"""Instruction tuning end to end: from a pretrained run to a chat model transformers uses.

A text run pretrains a few steps; chat runs start from it (train.init_from) on conversation files.
Checked: the loss and the validation loss are over the assistant's tokens only (against a
computation conversation by conversation), and the step's loss is their mean whatever the split
into micro-batches; a killed run resumes exactly; `generate --chat`; the export's chat template,
ids and loss equal moe_lm's in transformers, and its text-generation pipeline answers; mixtures
with pretraining text; an imported Mixtral keeps its own template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from moe_lm.cli import main
from moe_lm.config import config_from_dict
from moe_lm.data.chat import ChatEncoder, Conversation, chat_encoder
from moe_lm.data.chat_template import load_chat_template, write_chat_template
from moe_lm.data.tokenizer import Tokenizer
from moe_lm.errors import ConfigError
from moe_lm.state.weights import load_model_state, load_pretrained
from tests.integration.chat_data import chat_sections, conversations, messages_of, write_jsonl
from tests.integration.conftest import run_config_dict
from tests.unit.test_chat import MIXTRAL_TEMPLATE


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sft")


@pytest.fixture(scope="module")
def chat_files(root: Path) -> tuple[Path, Path]:
    # short exchanges (about 30 tokens) among the validation set: rows of 65 hold two of them
    short = [{"prompt": "Who?", "response": answer} for answer in ("Ay.", "No.", "I.")] * 4
    return (
        write_jsonl(root / "chat" / "train.jsonl", conversations(240, seed=0)),
        write_jsonl(root / "chat" / "val.jsonl", conversations(24, seed=1) + short),
    )


@pytest.fixture(scope="module")
def pretrained(root: Path, corpus: Path, tokenizer_dir: Path) -> Path:
    """A text run of 6 steps: what the chat runs start from."""
    cfg = run_config_dict(corpus, tokenizer_dir, root / "pretrain", data={"cache_dir": str(root / "cache")})
    path = root / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return root / "pretrain"


@pytest.fixture(scope="module")
def make_chat(root: Path, corpus: Path, tokenizer_dir: Path, chat_files: tuple[Path, Path], pretrained: Path):
    """name, sections -> a chat run config file (init_from the pretrained run)."""

    def make(name: str, **sections: dict[str, Any]) -> Path:
        merged: dict[str, dict[str, Any]] = {
            "data": chat_sections(*chat_files, cache_dir=str(root / "cache")),
            "train": {"init_from": str(pretrained), "max_steps": 6, "eval_every": 3, "eval_batches": 50},
            "logging": {"peak_tflops": 1.0},
        }
        for key, values in sections.items():
            merged[key] = {**merged.get(key, {}), **values}
        cfg = run_config_dict(corpus, tokenizer_dir, root / name, **merged)
        if "sources" in cfg["data"]:  # a mixture lists its files per source
            for key in ("train_files", "val_files", "kind"):
                cfg["data"].pop(key)
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def records(run: Path, kind: str = "train") -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def assistant_loss(model: Any, encoder: ChatEncoder, records_: list[dict[str, Any]], limit: int) -> float:
    """Mean cross-entropy over every assistant token of each conversation, run alone (no packing),
    cut to `limit` tokens as the packing cuts it."""
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records_:
            ids, mask = encoder.encode(Conversation(messages_of(record), "test"))
            ids, mask = torch.as_tensor(ids[:limit])[None], torch.as_tensor(mask[:limit])
            logits = model(ids).logits[0, :-1].float()
            losses = F.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float(losses[mask[1:].bool()].double().sum())
            count += int(mask[1:].sum())
    return total / count


@pytest.fixture(scope="module")
def sft_run(make_chat) -> Path:
    cfg = make_chat("sft")
    assert main(["train", str(cfg)]) == 0
    return Path(yaml.safe_load(cfg.read_text())["train"]["output_dir"])


def test_validation_loss_is_over_assistant_tokens_of_each_conversation_alone(
    sft_run, pretrained, chat_files, tokenizer_dir
):
    # step 0: the pretrained weights (init_from) on the held-out conversations
    _, model = load_pretrained(pretrained)
    encoder = chat_encoder(Tokenizer.load(tokenizer_dir))
    val = [json.loads(line) for line in chat_files[1].read_text().splitlines()]
    expected = assistant_loss(model.eval(), encoder, val, limit=65)
    first = records(sft_run, "eval")[0]
    assert first["step"] == 0 and first["loss_on"] == "assistant"
    assert first["val_loss"] == pytest.approx(expected, abs=1e-5)
    # and at the end, with the tuned weights
    _, tuned = load_pretrained(sft_run)
    assert records(sft_run, "eval")[-1]["val_loss"] == pytest.approx(
        assistant_loss(tuned.eval(), encoder, val, limit=65), abs=1e-5
    )


def test_train_records_say_the_loss_is_over_assistant_tokens(sft_run):
    recs = records(sft_run)
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert all(r["loss_on"] == "assistant" for r in recs)
    # the step's targets: fewer than its tokens (prompts, role headers and padding are not targets)
    assert all(0 < r["target_tokens"] < r["tokens"] / r["step"] for r in recs)
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"]


def test_step_loss_is_the_mean_over_its_assistant_tokens_whatever_the_micro_batches(make_chat, root):
    """Two micro-batches of 4 accumulated = one of 8: the same 8 rows, one loss over their targets.
    (A mean of the two micro-batch means weighs the tokens of the sparser one more.)"""
    train = {"max_steps": 1, "eval_every": 0}
    split = make_chat("split", train={**train, "micro_batch_size": 4, "grad_accum_steps": 2})
    whole = make_chat("whole", train={**train, "micro_batch_size": 8, "grad_accum_steps": 1})
    assert main(["train", str(split)]) == 0 and main(["train", str(whole)]) == 0
    (a,), (b,) = records(root / "split"), records(root / "whole")
    assert a["target_tokens"] == b["target_tokens"]
    assert a["lm_loss"] == pytest.approx(b["lm_loss"], abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # the gradient too, not just the value
    # the z-loss is a mean over the routed tokens (padding is not routed) of the step, as one pass
    assert a["z_loss"] == pytest.approx(b["z_loss"], rel=1e-6)


def test_killed_run_resumes_exactly(make_chat, sft_run, root):
    cfg = make_chat("killed", checkpoint={"every": 2, "keep_last": 2})
    env = {**os.environ, "MOE_LM_FAULT": "mid_step:5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moe_lm.cli", "train", str(cfg), "train.resume=auto"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    # the one command for a first start and every restart: init_from once, then the run's own checkpoints
    assert main(["train", str(cfg), "train.resume=auto"]) == 0
    ours, ref = records(root / "killed"), records(sft_run)
    assert [r["step"] for r in ours] == list(range(1, 7))
    for a, b in zip(ours, ref, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "target_tokens", "expert_load"):
            assert a[key] == b[key], (a["step"], key)
    assert [e["val_loss"] for e in records(root / "killed", "eval")][-1] == records(sft_run, "eval")[-1][
        "val_loss"
    ]
    wa, wb = (
        load_model_state(root / "killed" / "checkpoints" / "step-6"),
        load_model_state(sft_run / "checkpoints" / "step-6"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_generate_chat_prints_the_reply_to_the_templated_prompt(sft_run, tokenizer_dir, capsys):
    capsys.readouterr()
    args = [
        "generate",
        str(sft_run),
        "--chat",
        "--system",
        "Answer in one line.",
        "--prompt",
        "Who art thou?",
    ]
    assert main([*args, "--temperature", "0", "--max-new-tokens", "12"]) == 0
    reply = capsys.readouterr().out
    _, model = load_pretrained(sft_run)
    tok = Tokenizer.load(tokenizer_dir)
    prompt = chat_encoder(tok).prompt_ids(
        [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Who art thou?"}]
    )
    out = model.eval().generate(torch.tensor([prompt]), 12, temperature=0, eos_id=tok.eos_id)
    assert reply == tok.decode(out[0, len(prompt) :].tolist()) + "\n"
    assert main(["generate", str(sft_run), "--system", "x"]) == 2  # --system without --chat


@pytest.fixture(scope="module")
def exported(sft_run: Path, root: Path) -> Path:
    out = root / "export"
    assert main(["export", str(sft_run), "--out", str(out), "--dtype", "fp32"]) == 0
    return out


def test_export_carries_the_template_and_transformers_renders_the_same_ids(
    exported, tokenizer_dir, chat_files
):
    from transformers import AutoTokenizer

    template = load_chat_template(tokenizer_dir)
    assert (exported / "chat_template.jinja").read_text() == template  # transformers 5 reads this first
    assert json.loads((exported / "tokenizer_config.json").read_text())[
        "chat_template"
    ] == load_chat_template(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    encoder = chat_encoder(Tokenizer.load(tokenizer_dir))
    for record in [json.loads(line) for line in chat_files[1].read_text().splitlines()]:
        messages = messages_of(record)
        ids, mask = encoder.encode(Conversation(messages, "test"))
        got = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert got["input_ids"] == ids.tolist() and got["assistant_masks"] == mask.tolist()
    card = (exported / "README.md").read_text()
    assert "instruction-tuned with moe_lm" in card and "the assistant's tokens only" in card


def test_exported_model_loss_on_a_conversation_equals_moe_lms(exported, sft_run, chat_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(str(exported), local_files_only=True).eval()
    _, ours = load_pretrained(sft_run)
    ours.eval()
    for record in [json.loads(line) for line in chat_files[1].read_text().splitlines()[:4]]:
        enc = hf_tok.apply_chat_template(
            messages_of(record), return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
        )
        ids, mask = enc["input_ids"], enc["assistant_masks"].bool()
        labels = torch.where(mask, ids, -100)
        with torch.no_grad():
            theirs = hf_model(input_ids=ids, labels=labels).loss  # transformers shifts inside
            mine = ours(ids[:, :-1], labels=labels[:, 1:]).lm_loss
        assert float(theirs) == pytest.approx(float(mine), abs=1e-4)


def test_text_generation_pipeline_answers_on_the_export_as_moe_lm_does(exported, sft_run, tokenizer_dir):
    from transformers import pipeline

    chat = pipeline("text-generation", model=str(exported))
    messages = [{"role": "user", "content": "Who art thou?"}]
    out = chat(messages, max_new_tokens=8, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    # greedy, the same reply as moe_lm's generate --chat
    _, model = load_pretrained(sft_run)
    tok = Tokenizer.load(tokenizer_dir)
    prompt = chat_encoder(tok).prompt_ids(messages)
    ids = model.eval().generate(torch.tensor([prompt]), 8, temperature=0, eos_id=tok.eos_id)
    assert reply["content"] == tok.decode(ids[0, len(prompt) :].tolist())


def test_mixture_with_pretraining_text(make_chat, root, corpus, chat_files):
    train, val = chat_files
    sources = {
        "chat": {"kind": "chat", "files": [str(train)], "val_files": [str(val)], "weight": 3.0},
        "text": {"files": [str(corpus)], "val_fraction": 0.05},
    }
    cfg = make_chat("mixture", data={"sources": sources, "train_on": "assistant"})
    assert main(["train", str(cfg)]) == 0
    recs = records(root / "mixture")
    assert recs[-1]["tokens/chat"] > recs[-1]["tokens/text"] > 0
    assert all(r["loss_on"] == "assistant" for r in recs)
    last_eval = records(root / "mixture", "eval")[-1]
    assert {"val/chat/loss", "val/text/loss"} <= last_eval.keys()


def test_eval_reads_data_files_as_conversations_with_kind_chat_in_a_mixture(root, chat_files, capsys):
    """`moe-lm eval --data` in a run of chat and text sources: files are text by default, and
    conversations with --kind chat, evaluated as the run's chat source is."""
    run = root / "mixture"
    if not run.is_dir():
        pytest.skip("needs the run of test_mixture_with_pretraining_text")
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(chat_files[1]), "--kind", "chat"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("(over assistant tokens)")
    expected = records(run, "eval")[-1]["val/chat/loss"]
    assert float(line.split()[1]) == pytest.approx(expected, abs=1e-4)
    assert main(["eval", str(run), "--data", str(chat_files[1])]) == 2  # read as text: they are not
    assert "has no field 'text'" in (line := _one_line(capsys)) and "set --text-field" in line
    # the flag the line names exists: records of text in another field
    bodies = write_jsonl(
        root / "bodies.jsonl", [{"body": m["content"]} for r in conversations(40, 2) for m in messages_of(r)]
    )
    assert main(["eval", str(run), "--data", str(bodies), "--text-field", "body"]) == 0
    assert main(["eval", str(run), "--text-field", "response"]) == 2
    assert "--text-field says how to read --data FILE" in _one_line(capsys)


def test_imported_mixtral_keeps_its_own_template(exported, make_chat, root, tokenizer_dir):
    mixtral = root / "mixtral"
    mixtral.mkdir()
    for f in exported.iterdir():  # a transformers Mixtral folder whose template is Mixtral-Instruct's
        if f.is_file():
            (mixtral / f.name).write_bytes(f.read_bytes())
    (mixtral / "chat_template.jinja").unlink()
    write_chat_template(mixtral, MIXTRAL_TEMPLATE)
    assert main(["import", str(mixtral), "--out", str(root / "imported")]) == 0
    records_ = [{"prompt": "Who art thou?", "response": "A friend."}] * 40
    train = write_jsonl(root / "mixtral-chat" / "train.jsonl", records_)
    cfg = make_chat(
        "from-mixtral",
        data={"tokenizer": str(mixtral), "train_files": [str(train)], "val_files": [str(train)]},
        train={"init_from": str(root / "imported"), "max_steps": 2, "eval_every": 0},
    )
    assert main(["train", str(cfg)]) == 0
    assert (
        main(
            [
                "export",
                str(root / "from-mixtral"),
                "--out",
                str(root / "from-mixtral-export"),
                "--tokenizer",
                str(mixtral),
            ]
        )
        == 0
    )
    assert load_chat_template(root / "from-mixtral-export") == MIXTRAL_TEMPLATE
    # the reply and its </s> are the targets, found without generation tags
    encoder = chat_encoder(Tokenizer.load(mixtral))
    ids, mask = encoder.encode(Conversation(messages_of(records_[0]), "test"))
    tok = Tokenizer.load(mixtral)
    assert tok.decode([i for i, m in zip(ids.tolist(), mask.tolist()) if m]) == "A friend."
    assert ids[mask.astype(bool)][-1] == tok.eos_id


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


BAD_RECORDS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant turn"),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]},
        "message 1 has unknown role 'bot'",
    ),
    (
        {"text": "no roles here"},
        "has no 'messages' list and no 'prompt'/'response' fields (fields: text), so it has no roles",
    ),
]


@pytest.mark.parametrize(("bad", "words"), BAD_RECORDS, ids=["no-assistant", "unknown-role", "no-roles"])
def test_bad_conversation_is_one_line_exit_2_and_nothing_written(make_chat, root, capsys, bad, words):
    name = f"bad-{words.split()[0]}-{len(words)}"
    good = conversations(5, seed=3)
    files = write_jsonl(root / name / "data.jsonl", [*good[:3], bad, *good[3:]])
    cfg = make_chat(
        name + "-run",
        data={
            "train_files": [str(files)],
            "val_files": [str(files)],
            "cache_dir": str(root / name / "cache"),
        },
    )
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    line = _one_line(capsys)
    assert words in line and "the record at byte" in line and str(files) in line
    assert not (root / (name + "-run")).exists()
    assert not list((root / name / "cache" / "store" / "shards").glob("*.json"))  # no shard completed


def test_tokenizer_without_template_is_one_line_exit_2(make_chat, root, tokenizer_dir, capsys):
    bare = root / "bare-tok"
    bare.mkdir()
    (bare / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    cfg = make_chat("bare-run", data={"tokenizer": str(bare)})
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    assert (
        "has no chat template, which chat data needs; add one with `moe-lm tokenizer chat-template"
        in _one_line(capsys)
    )
    assert not (root / "bare-run").exists()


def test_train_on_assistant_with_text_data_is_one_line_exit_2(corpus, tokenizer_dir, tmp_path, capsys):
    cfg = run_config_dict(corpus, tokenizer_dir, tmp_path / "run", data={"train_on": "assistant"})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    assert (
        "data.train_on: assistant needs conversations with roles, but every training source is plain text"
        in _one_line(capsys)
    )
    assert not (tmp_path / "run").exists()


def test_chat_config_errors():
    base = {"data": {"kind": "chat", "train_files": ["x.jsonl"], "format": "text"}}
    with pytest.raises(ConfigError, match=r"data.format: text files hold no conversation records"):
        config_from_dict(base)
    streaming = {"data": {"sources": {"c": {"dataset": "d", "kind": "chat", "streaming": True}}}}
    with pytest.raises(
        Exception, match=r"data.sources.c.streaming: conversations are packed from the token store"
    ):
        config_from_dict(streaming)


def test_eval_command_gives_the_runs_own_validation_loss(sft_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(sft_run)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("(over assistant tokens)")
    assert float(line.split()[1]) == pytest.approx(records(sft_run, "eval")[-1]["val_loss"], abs=1e-4)


def test_data_prepare_reports_conversations_and_packed_rows(make_chat, capsys):
    capsys.readouterr()
    assert main(["data", "prepare", str(make_chat("prepare-only"))]) == 0
    out = capsys.readouterr().out
    assert "packed" in out.splitlines()[1] and "240" in out.splitlines()[1]  # the training source's row
    assert "conversations packed into" in out and "rows of 65 tokens" in out


def test_rows_of_text_in_a_mixture_get_their_documents_from_eos():
    """data.document_mask with packed conversations and text in one batch: packed rows keep their
    example ids, text rows are cut at EOS as in pretraining."""
    from types import SimpleNamespace

    from moe_lm.data.blocks import encode_packed, split_inputs
    from moe_lm.train.trainer import Trainer

    packed = encode_packed(
        np.array([1, 5, 6, 1, 7, 8]), np.array([0, 1, 1, 0, 1, 1]), np.array([0, 0, 0, 1, 1, 1])
    )
    text = np.array([5, 2, 6, 7, 2, 8])  # EOS = 2
    batch = split_inputs(np.stack([packed, text]))
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(data=SimpleNamespace(document_mask=True)), tokenizer=SimpleNamespace(eos_id=2)
    )
    assert Trainer.document_ids(trainer, batch).tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]  # type: ignore[arg-type]
    trainer.cfg.data.document_mask = False
    assert Trainer.document_ids(trainer, batch).tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("init", "model", "words"),
    [
        ("nowhere", {}, "no such checkpoint directory"),
        ("pretrain", {"num_experts": 8}, "has model.num_experts = 4 but the config says 8"),
    ],
    ids=["missing", "other-shape"],
)
def test_a_bad_init_from_stops_before_any_tokenizer_or_store_is_made(
    make_chat, root, capsys, pretrained, init, model, words
):
    name = f"bad-init-{init}"
    data = {"tokenizer": str(root / f"{name}-tok"), "cache_dir": str(root / f"{name}-cache")}
    cfg = make_chat(name, data=data, train={"init_from": str(root / init)}, model=model)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    line = _one_line(capsys)
    assert "train.init_from" in line or str(root / init) in line
    assert words in line
    assert not any((root / f"{name}{suffix}").exists() for suffix in ("-tok", "-cache", ""))
