"""`datasets` sources, built locally (nothing is downloaded): save_to_disk directories, a dataset
name read from the local Hugging Face cache offline, the offline error, and streaming sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moe_lm.config import Config, config_from_dict
from moe_lm.data.corpus import open_data
from moe_lm.data.loader import ResumableLoader
from moe_lm.data.tokenizer import Tokenizer, train_tokenizer
from moe_lm.errors import UserError
from tests.unit.test_data import _blocks, _stream, _text


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("hf-tok")
    (root / "corpus.txt").write_text(_text(0, 500), encoding="utf-8")
    return Tokenizer.load(train_tokenizer([str(root / "corpus.txt")], 300, root / "tok"))


DOCS = [_text(s, 4) for s in range(60)]


def _cfg(tmp_path: Path, tok: Tokenizer, sources: dict[str, Any], **data: Any) -> Config:
    return config_from_dict(
        {
            "model": {"vocab_size": 300},
            "data": {
                "sources": sources,
                "tokenizer": str(tok.path),
                "cache_dir": str(tmp_path / "cache"),
                "seq_len": 15,
                "val_fraction": 0.0,
                **data,
            },
        }
    )


def _all(blocks: Any) -> torch.Tensor:
    return torch.from_numpy(blocks.read(np.arange(len(blocks))))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    import datasets

    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))}),
            "test": datasets.Dataset.from_dict({"body": DOCS[:5], "n": list(range(5))}),
        }
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_a_save_to_disk_directory_is_a_source(tmp_path: Path, tok: Tokenizer, saved: Path) -> None:
    cfg = _cfg(tmp_path, tok, {"wiki": {"dataset": str(saved), "text_field": "body"}})
    data = open_data(cfg, tok)
    assert torch.equal(_all(data.train[0].blocks), _blocks(_stream(tok, DOCS), 16))
    test_split = _cfg(tmp_path, tok, {"wiki": {"dataset": str(saved), "split": "test", "text_field": "body"}})
    assert torch.equal(_all(open_data(test_split, tok).train[0].blocks), _blocks(_stream(tok, DOCS[:5]), 16))
    with pytest.raises(UserError, match=r"split 'dev' not found \(splits: train, test\)"):
        open_data(
            _cfg(tmp_path, tok, {"w": {"dataset": str(saved), "split": "dev", "text_field": "body"}}), tok
        )
    with pytest.raises(UserError, match=r"has no field 'text' \(fields: body, n\)"):
        open_data(_cfg(tmp_path, tok, {"w": {"dataset": str(saved)}}), tok)


def _cached_hub_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Put 'someone/toy' into a fresh Hugging Face datasets cache, as a download would have, by
    loading a local copy and renaming its cache entry; returns the name."""
    import datasets

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    local = tmp_path / "toy"
    local.mkdir()
    (local / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    datasets.load_dataset(str(local), split="train")  # cached as toy/default/0.0.0/HASH/toy-train.arrow
    shutil.move(str(cache / "toy"), str(cache / "someone___toy"))  # where a download of someone/toy lands
    shutil.rmtree(local)
    return "someone/toy"


def test_a_dataset_name_loads_from_the_local_cache_offline(
    tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    name = _cached_hub_dataset(tmp_path, monkeypatch)
    data = open_data(_cfg(tmp_path, tok, {"toy": {"dataset": name}}), tok)
    assert torch.equal(_all(data.train[0].blocks), _blocks(_stream(tok, DOCS), 16))


def test_an_unknown_dataset_offline_is_one_line_naming_it(
    tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    cfg = _cfg(tmp_path, tok, {"c4": {"dataset": "nobody/not-a-dataset", "dataset_config": "en"}})
    with pytest.raises(UserError) as e:
        open_data(cfg, tok)
    message = str(e.value)
    assert message.startswith(
        "data.sources.c4.dataset: cannot load dataset 'nobody/not-a-dataset', config 'en'"
    )
    assert "not in the local Hugging Face cache and the Hub is offline" in message and "\n" not in message


def _streaming_cfg(tmp_path: Path, tok: Tokenizer, saved: Path) -> Config:
    return _cfg(
        tmp_path,
        tok,
        {
            "book": {"files": [str(tmp_path / "book.txt")], "weight": 1.0},
            "wiki": {"dataset": str(saved), "text_field": "body", "streaming": True, "weight": 2.0},
        },
    )


def test_a_streaming_source_serves_the_prepared_blocks_in_order_and_repeats(
    tmp_path: Path, tok: Tokenizer, saved: Path
) -> None:
    (tmp_path / "book.txt").write_text(_text(7, 100), encoding="utf-8")
    data = open_data(_streaming_cfg(tmp_path, tok, saved), tok)
    stream = data.train[1].blocks
    expected = _blocks(_stream(tok, DOCS), 16)
    got = torch.from_numpy(np.stack([stream.block(i) for i in range(len(expected) + 3)]))
    assert torch.equal(got[: len(expected)], expected)
    assert torch.equal(got[len(expected) :], expected[:3]) and stream.epoch == 1  # the next epoch
    shards = [p.name for p in (tmp_path / "cache" / "store" / "shards").glob("*.json")]
    assert shards and all(n.startswith("book.txt-") for n in shards)  # nothing of the stream was prepared


def test_a_mixture_with_a_streaming_source_resumes_exactly_on_any_world_size(
    tmp_path: Path, tok: Tokenizer, saved: Path
) -> None:
    (tmp_path / "book.txt").write_text(_text(7, 100), encoding="utf-8")
    cfg = _streaming_cfg(tmp_path, tok, saved)

    def loader(rank: int = 0, size: int = 1, batch: int = 4) -> ResumableLoader:
        return ResumableLoader(open_data(cfg, tok).train, batch, rank, size, seed=3)

    single = loader(batch=4)
    ranks = [loader(r, 2, 2) for r in range(2)]
    for _ in range(120):  # 480 samples, about 320 of the stream's 231 blocks
        whole = single.next_batch()[0]
        parts = torch.cat([r.next_batch()[0] for r in ranks])
        assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, parts.tolist()))
    assert single.sources[1].blocks.epoch == 1  # the stream ended and started over on the way
    state = ranks[1].state_dict()
    expected = [ranks[1].next_batch() for _ in range(20)]
    restored = loader(1, 2, 2)
    restored.load_state_dict(state)
    for (x, y), (ex, ey) in zip((restored.next_batch() for _ in range(20)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert single.consumed() == ranks[0].consumed() and sum(single.consumed().values()) == 480


def test_a_streaming_mixture_resumes_on_another_world_size_from_one_saved_position(
    tmp_path: Path, tok: Tokenizer, saved: Path
) -> None:
    """The main process saves the position (streams moved up to where the run's samples of them
    end, so the state is JSON and global); 1 -> 2 -> 1 processes continue the same samples."""
    (tmp_path / "book.txt").write_text(_text(7, 100), encoding="utf-8")
    cfg = _streaming_cfg(tmp_path, tok, saved)

    def loader(rank: int = 0, size: int = 1, batch: int = 4) -> ResumableLoader:
        return ResumableLoader(open_data(cfg, tok).train, batch, rank, size, seed=3)

    ref = loader()
    for _ in range(30):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # what data_position.json holds
    assert state["sources"][1]["stream"]["next_ordinal"] == state["sources"][1]["consumed"]
    expected = torch.cat([ref.next_batch()[0] for _ in range(40)])
    ranks = [loader(r, 2, 2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    got = [torch.cat([r.next_batch()[0] for r in ranks]) for _ in range(20)]
    assert sorted(map(tuple, torch.cat(got).tolist())) == sorted(map(tuple, expected[:80].tolist()))
    back = loader()
    back.load_state_dict(ranks[0].state_dict())  # rank 0 as the main process; 2 -> 1
    assert torch.equal(torch.cat([back.next_batch()[0] for _ in range(20)]), expected[80:])


def test_a_streaming_source_with_a_changed_global_batch_never_crashes(
    tmp_path: Path, tok: Tokenizer, saved: Path
) -> None:
    """The loader rounded the position down and asked the stream for a block it had passed:
    `ValueError: stream block 5 was already passed`, a traceback. Now: exact, or one line."""
    (tmp_path / "book.txt").write_text(_text(7, 100), encoding="utf-8")
    cfg = _streaming_cfg(tmp_path, tok, saved)
    ref = ResumableLoader(open_data(cfg, tok).train, 4, seed=3)
    for _ in range(3):
        ref.next_batch()  # 12 samples
    state = ref.state_dict()
    expected = torch.cat([ref.next_batch()[0] for _ in range(3)])  # samples 12..23
    six = ResumableLoader(open_data(cfg, tok).train, 6, seed=3)
    six.load_state_dict(state)
    assert torch.equal(torch.cat([six.next_batch()[0] for _ in range(2)]), expected)
    five = ResumableLoader(open_data(cfg, tok).train, 5, seed=3)
    with pytest.raises(UserError, match=r"stopped 12 samples into the data, which the new global batch 5"):
        five.load_state_dict(state)


def test_the_per_rank_stream_positions_of_an_older_checkpoint_become_one(
    tmp_path: Path, tok: Tokenizer, saved: Path
) -> None:
    """Before the position was global each rank saved its own loader state, streams at different
    points; the furthest one stands where the run's samples of that stream end."""
    (tmp_path / "book.txt").write_text(_text(7, 100), encoding="utf-8")
    cfg = _streaming_cfg(tmp_path, tok, saved)
    ranks = [ResumableLoader(open_data(cfg, tok).train, 2, r, 2, seed=3) for r in range(2)]
    for _ in range(25):
        for r in ranks:
            r.next_batch()
    old = [
        {
            "epoch": 0,
            "position": 25,
            "seed": 3,
            "num_blocks": [len(r.sources[0].blocks), None],
            "micro_batch_size": 2,
            "dp_size": 2,
            "order": "feistel",
            "sources": [[s.name, s.weight] for s in r.sources],
            "streams": {"wiki": r.sources[1].blocks.state_dict()},  # as each rank left it
        }
        for r in ranks
    ]
    assert old[0]["streams"]["wiki"]["next_ordinal"] != old[1]["streams"]["wiki"]["next_ordinal"]
    expected = torch.cat([torch.cat([r.next_batch()[0] for r in ranks]) for _ in range(10)])
    one = ResumableLoader(open_data(cfg, tok).train, 4, seed=0)
    assert one.load_state_dict(old) == []
    got = torch.cat([one.next_batch()[0] for _ in range(10)])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
