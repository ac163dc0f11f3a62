"""Conversations from every kind of input: JSON Lines, a JSON array, parquet (messages as a list of
structs, or prompt/response columns) and a `datasets` folder give the same examples; a chat source
in a text file, or a parquet file without roles, is refused before tokenising."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_lm.config import config_from_dict
from moe_lm.data.chat import ChatEncoder, Conversation
from moe_lm.data.chat_template import DEFAULT_CHAT_TEMPLATE
from moe_lm.data.corpus import open_data
from moe_lm.data.tokenizer import Tokenizer, ensure_tokenizer, train_tokenizer
from moe_lm.errors import UserError
from tests.integration.chat_data import conversations, messages_of

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"
RECORDS = conversations(30, seed=5)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    (root / "c.txt").write_text(SHAKESPEARE.read_text()[:100_000])
    return train_tokenizer([str(root / "c.txt")], 384, root / "tok")


def _inputs(root: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    paths = {"jsonl": root / "c.jsonl", "json": root / "c.json", "parquet": root / "c.parquet"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    paths["json"].write_text(json.dumps(RECORDS))
    # parquet: every record as a messages list of structs (prompt/response turned into turns too)
    pq.write_table(pa.Table.from_pylist([{"messages": messages_of(r)} for r in RECORDS]), paths["parquet"])
    pairs = [r for r in RECORDS if "prompt" in r]
    paths["pairs"] = root / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(pairs), paths["pairs"])
    paths["dataset"] = root / "ds"
    datasets.Dataset.from_list([{"messages": messages_of(r)} for r in RECORDS]).save_to_disk(
        str(paths["dataset"])
    )
    return paths


def _examples(cfg_data: dict, tok: Path, root: Path) -> list[list[int]]:
    cfg = config_from_dict(
        {
            "model": {
                "vocab_size": 384,
                "hidden_size": 32,
                "intermediate_size": 32,
                "num_layers": 1,
                "num_heads": 2,
                "num_kv_heads": 1,
                "max_seq_len": 256,
                "num_experts": 2,
                "top_k": 1,
            },
            "data": {
                "tokenizer": str(tok),
                "seq_len": 255,
                "cache_dir": str(root / "cache"),
                "val_fraction": 0.0,
                **cfg_data,
            },
        }
    )
    blocks = open_data(cfg, Tokenizer.load(tok)).train[0].blocks
    rows = blocks.read(np.arange(len(blocks)))
    ids, docs = rows & ((1 << 32) - 1), (rows >> 33) & ((1 << 29) - 1)
    found = []
    for r in range(len(rows)):
        for d in np.unique(docs[r]).tolist():
            example = ids[r][docs[r] == d].tolist()
            if set(example) != {2}:  # padding is eos only
                found.append(example)
    return sorted(found)


def test_every_input_kind_gives_the_same_conversations(tok, tmp_path):
    paths = _inputs(tmp_path / "in")
    encoder = ChatEncoder(Tokenizer.load(tok), DEFAULT_CHAT_TEMPLATE)
    expected = sorted(encoder.encode(Conversation(messages_of(r), ""))[0].tolist() for r in RECORDS)
    for kind in ("jsonl", "json", "parquet"):
        assert _examples({"kind": "chat", "train_files": [str(paths[kind])]}, tok, tmp_path) == expected, kind
    sources = {"chat": {"kind": "chat", "dataset": str(paths["dataset"])}}
    assert _examples({"sources": sources}, tok, tmp_path) == expected
    pairs = [r for r in RECORDS if "prompt" in r]
    assert _examples({"kind": "chat", "train_files": [str(paths["pairs"])]}, tok, tmp_path) == sorted(
        encoder.encode(Conversation(messages_of(r), ""))[0].tolist() for r in pairs
    )


def test_text_files_and_roleless_tables_are_refused_before_tokenising(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "plain.txt").write_text("ROMEO: hello\n")
    pq.write_table(pa.Table.from_pylist([{"text": "hi"}]), tmp_path / "t.parquet")
    for name, words in (
        ("plain.txt", "plain.txt' is plain text, but chat data are records (JSON Lines, JSON or parquet)"),
        ("t.parquet", "t.parquet' has no 'messages' list and no 'prompt'/'response' fields (fields: text)"),
    ):
        with pytest.raises(UserError) as e:
            _examples({"kind": "chat", "train_files": [str(tmp_path / name)]}, tok, tmp_path)
        assert words in str(e.value)
    assert not list((tmp_path / "cache" / "store" / "shards").glob("*.json"))


def test_a_tokenizer_trained_on_chat_data_learns_from_the_messages(tmp_path):
    from moe_lm.data.tokenizer import _source_texts

    records = conversations(400, seed=2)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = config_from_dict(
        {
            "model": {"vocab_size": 384},
            "data": {"kind": "chat", "train_files": [str(path)], "tokenizer": str(tmp_path / "tok")},
        }
    )
    (texts,) = _source_texts(cfg)  # the messages' text, not the JSON around it
    assert list(texts) == [m["content"] for r in records for m in messages_of(r) if m["content"]]
    tok = Tokenizer.load(ensure_tokenizer(cfg))
    assert tok.vocab_size == 384 and (tmp_path / "tok" / "chat_template.jinja").is_file()


def test_a_dataset_with_messages_as_a_sequence_feature_gives_the_same_conversations(tok, tmp_path):
    """`Sequence({role, content})` (how many Hub datasets declare messages) comes out of `datasets`
    as one dict of lists per row, not a list of dicts: the same conversations all the same."""
    import datasets

    features = datasets.Features(
        {
            "messages": datasets.Sequence(
                {"role": datasets.Value("string"), "content": datasets.Value("string")}
            )
        }
    )
    columns = [
        {"role": [m["role"] for m in messages_of(r)], "content": [m["content"] for m in messages_of(r)]}
        for r in RECORDS
    ]
    datasets.Dataset.from_dict({"messages": columns}, features=features).save_to_disk(str(tmp_path / "ds"))
    encoder = ChatEncoder(Tokenizer.load(tok), DEFAULT_CHAT_TEMPLATE)
    expected = sorted(encoder.encode(Conversation(messages_of(r), ""))[0].tolist() for r in RECORDS)
    sources = {"chat": {"kind": "chat", "dataset": str(tmp_path / "ds")}}
    assert _examples({"sources": sources}, tok, tmp_path) == expected
