"""The BPE tokenizer: lossless round trips, parity with transformers, determinism, errors, the CLI."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest

from moe_lm.config import config_from_dict
from moe_lm.data.tokenizer import Tokenizer, check_vocab, ensure_tokenizer, tokenizer_main, train_tokenizer
from moe_lm.errors import UserError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"

TRICKY = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "\tTab first\tand inside",
    "\n\nnewlines first\n",
    "line one\n  indented line\n\ttabbed line\n",
    "trailing spaces   ",
    "ünïcødé, 日本語 and an emoji 🙂",
    "digits 1234567890 and 3.14159 and x=42",
    "windows\r\nline ends\r\n",
    "ROMEO:\nWhat, ho! apothecary!",
    " ",
    "",
]


@pytest.fixture(scope="module")
def shakespeare_tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "shakespeare-8k"
    return train_tokenizer([str(SHAKESPEARE)], 8000, out)


def _small_corpus(path: Path, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    words = ["the", "king", "queen", "speak", "hear", "me", "lord", "café", "naïve", "42", "7"]
    lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(1, 12))) for _ in range(400)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_round_trip_is_lossless(shakespeare_tok: Path) -> None:
    tok = Tokenizer.load(shakespeare_tok)
    for text in TRICKY:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
    # encode adds no BOS/EOS
    assert tok.encode("hi")[0] != tok.bos_id and tok.encode("hi")[-1] != tok.eos_id


def test_special_ids_and_size(shakespeare_tok: Path) -> None:
    tok = Tokenizer.load(shakespeare_tok)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 8000)
    # </s> and <s> are control tokens: they decode to nothing, and their text is not special
    assert tok.decode([tok.bos_id, *tok.encode("a"), tok.eos_id]) == "a"
    assert tok.eos_id not in tok.encode("</s>")


def test_digits_are_split(shakespeare_tok: Path) -> None:
    tok = Tokenizer.load(shakespeare_tok)
    ids = tok.encode("1234567890")
    assert [tok.decode([i]) for i in ids] == list("1234567890")


def test_ids_and_decoding_match_transformers(shakespeare_tok: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(shakespeare_tok)
    tok = Tokenizer.load(shakespeare_tok)
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    text = SHAKESPEARE.read_text()
    rnd = random.Random(0)
    samples = list(TRICKY)
    for i in range(150):  # random slices, some starting with spaces or tabs
        start = rnd.randrange(len(text) - 400)
        piece = text[start : start + rnd.randrange(1, 400)]
        samples.append((" " * (i % 3) + "\t" * (i % 5 == 0)) + piece)
    for s in samples:
        ids = tok.encode(s)
        assert hf.encode(s, add_special_tokens=False) == ids, repr(s)
        assert hf.decode(ids) == tok.decode(ids) == s, repr(s)
    # a decoded slice of a longer text keeps its leading space (no dummy prefix is stripped)
    ids = tok.encode("to be or not to be")
    assert hf.decode(ids[3:]) == tok.decode(ids[3:]) and tok.decode(ids[3:]).startswith(" ")


def test_line_by_line_encoding_equals_whole_text(shakespeare_tok: Path) -> None:
    # The dataset tokenises text files line by line; this must give the ids of the whole text.
    tok = Tokenizer.load(shakespeare_tok)
    text = SHAKESPEARE.read_text()[:100_000] + "\n  indented\n\n\ttab\n"
    by_line = [i for line in text.splitlines(keepends=True) for i in tok.encode(line)]
    assert by_line == tok.encode(text)


def test_training_is_deterministic(tmp_path: Path) -> None:
    corpus = _small_corpus(tmp_path / "c.txt")
    a = train_tokenizer([str(corpus)], 300, tmp_path / "a")
    b = train_tokenizer([str(corpus)], 300, tmp_path / "b")
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()
    assert Tokenizer.load(a).vocab_size == 300
    cfg = json.loads((a / "tokenizer_config.json").read_text())
    assert "local_files_only" not in cfg and cfg["add_prefix_space"] is False


def test_a_glob_with_empty_files_skips_them_with_a_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "d").mkdir()
    _small_corpus(tmp_path / "d" / "a.txt")
    (tmp_path / "d" / "b.txt").write_bytes(b"")
    with_empty = Tokenizer.load(train_tokenizer([str(tmp_path / "d" / "*.txt")], 300, tmp_path / "t1"))
    assert "--input: skipped 1 empty file(s)" in capsys.readouterr().err
    alone = Tokenizer.load(train_tokenizer([str(tmp_path / "d" / "a.txt")], 300, tmp_path / "t2"))
    assert with_empty.model_bytes == alone.model_bytes
    with pytest.raises(UserError, match="is empty"):  # nothing but empty files is still an error
        train_tokenizer([str(tmp_path / "d" / "b.txt")], 300, tmp_path / "t3")


def test_train_from_jsonl_and_glob(tmp_path: Path) -> None:
    corpus = _small_corpus(tmp_path / "c.txt").read_text().splitlines()
    (tmp_path / "shards").mkdir()
    for k in range(2):
        rows = [json.dumps({"body": line, "id": i}) for i, line in enumerate(corpus[k::2])]
        (tmp_path / "shards" / f"part{k}.jsonl").write_text("\n".join(rows) + "\n")
    out = train_tokenizer(
        [str(tmp_path / "shards" / "*.jsonl")],
        300,
        tmp_path / "tok",
        text_field="body",
    )
    tok = Tokenizer.load(out)
    assert tok.decode(tok.encode(corpus[0])) == corpus[0]
    # "the" is frequent in the corpus, so BPE learned it as one piece
    assert len(tok.encode("the")) == 1
    with pytest.raises(UserError, match=r"no field 'text' .*--text-field"):
        train_tokenizer([str(tmp_path / "shards" / "part0.jsonl")], 300, tmp_path / "t2")


def test_training_errors_are_one_line(tmp_path: Path) -> None:
    corpus = _small_corpus(tmp_path / "c.txt")
    with pytest.raises(UserError, match=r"vocab size 5000 is too large .*c\.txt.*at most \d+") as e:
        train_tokenizer([str(corpus)], 5000, tmp_path / "tok")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"vocab size 260 is too small .* needs at least 2\d\d"):
        train_tokenizer([str(corpus)], 260, tmp_path / "tok")
    with pytest.raises(UserError, match=r"no file matches '.*nothing\*\.txt'"):
        train_tokenizer([str(tmp_path / "nothing*.txt")], 300, tmp_path / "tok")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    with pytest.raises(UserError, match=r"notes\.md.*choose an empty --out"):
        train_tokenizer([str(corpus)], 300, tmp_path / "busy")
    assert not (tmp_path / "tok").exists()


def test_retraining_replaces_the_directory(tmp_path: Path) -> None:
    corpus = _small_corpus(tmp_path / "c.txt")
    out = train_tokenizer([str(corpus)], 300, tmp_path / "tok")
    train_tokenizer([str(corpus)], 320, out)
    assert Tokenizer.load(out).vocab_size == 320
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp dirs left


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no tokenizer at '.*missing'.*moe-lm tokenizer train"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"is not a sentencepiece model.*retrain"):
        Tokenizer.load(tmp_path / "bad")


def test_check_vocab(shakespeare_tok: Path) -> None:
    tok = Tokenizer.load(shakespeare_tok)
    check_vocab(tok, 8000)
    check_vocab(tok, 8192)  # spare embedding rows are fine
    with pytest.raises(
        UserError, match=r"has 8000 tokens but model.vocab_size = 4000; set model.vocab_size=8000"
    ):
        check_vocab(tok, 4000)


def test_pickles_for_worker_processes(shakespeare_tok: Path) -> None:
    tok = Tokenizer.load(shakespeare_tok)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("To be, or not") == tok.encode("To be, or not")
    assert clone.fingerprint == tok.fingerprint


def test_ensure_tokenizer_trains_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _small_corpus(tmp_path / "c.txt")
    data = {
        "train_files": [str(corpus)],
        "tokenizer": str(tmp_path / "tok"),
        "cache_dir": str(tmp_path / "cache"),
    }
    cfg = config_from_dict({"model": {"vocab_size": 300}, "data": data})
    out = ensure_tokenizer(cfg)
    assert "training a 300-token" in capsys.readouterr().out
    model = (out / "tokenizer.model").read_bytes()
    cfg2 = config_from_dict({"model": {"vocab_size": 310}, "data": data})
    assert ensure_tokenizer(cfg2) == out  # an existing tokenizer is kept, whatever the vocab size
    assert capsys.readouterr().out == ""
    assert (out / "tokenizer.model").read_bytes() == model


def test_cli_train_and_ensure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _small_corpus(tmp_path / "c.txt")
    out = tmp_path / "tok"
    assert tokenizer_main(["train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 0
    assert "wrote a 300-token tokenizer" in capsys.readouterr().out
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  train_files: [{corpus}]\n  tokenizer: {out}\n  cache_dir: {tmp_path / 'c'}\n"
    )
    assert tokenizer_main(["ensure", "--config", str(config), "model.vocab_size=512"]) == 0
    assert "300 tokens (model.vocab_size = 512)" in capsys.readouterr().out
    with pytest.raises(UserError, match="set model.vocab_size=300"):
        tokenizer_main(["ensure", "--config", str(config), "model.vocab_size=299"])
    with pytest.raises(UserError, match="--vocab-size must be at least 260"):
        tokenizer_main(["train", "--input", str(corpus), "--vocab-size", "100", "--out", str(out)])
