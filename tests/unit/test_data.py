"""Data pipeline: reading text/JSON(L)/parquet through the token store, packing with EOS, splits,
bad input, who prepares, and the loader."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moe_lm.config import Config, config_from_dict
from moe_lm.data import files as data_files
from moe_lm.data.corpus import open_data
from moe_lm.data.loader import ResumableLoader, eval_batches
from moe_lm.data.tokenizer import Tokenizer, train_tokenizer
from moe_lm.errors import UserError

WORDS = ["the", "king", "queen", "speak", "hear", "me", "lord", "café", "naïve", "42", "7", "日本"]


def _text(seed: int, lines: int) -> str:
    rnd = random.Random(seed)
    out = []
    for _ in range(lines):
        indent = rnd.choice(["", "", " ", "\t", "  "])
        out.append(indent + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(0, 9))))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("data-tok")
    (root / "corpus.txt").write_text(_text(0, 500), encoding="utf-8")
    return Tokenizer.load(train_tokenizer([str(root / "corpus.txt")], 300, root / "tok"))


def _cfg(tmp_path: Path, tok: Tokenizer, **data: Any) -> Config:
    data.setdefault("seq_len", 15)
    data.setdefault("val_fraction", 0.0)
    data = {"tokenizer": str(tok.path), "cache_dir": str(tmp_path / "cache"), **data}
    return config_from_dict({"model": {"vocab_size": 300}, "data": data})


def load_blocks(cfg: Config, tok: Tokenizer, split: str, **kwargs: Any) -> torch.Tensor:
    """Every block of the shorthand source's train or val split, read from the store (tests only)."""
    data = open_data(cfg, tok, train=split == "train", **kwargs)
    blocks = data.train[0].blocks if split == "train" else data.val["corpus"]
    return torch.from_numpy(blocks.read(np.arange(len(blocks))))


def _stream(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [i for d in docs for i in [*tok.encode(d), tok.eos_id]]


def _blocks(stream: list[int], block_len: int) -> torch.Tensor:
    n = len(stream) // block_len
    return torch.tensor(stream[: n * block_len]).view(n, block_len)


def test_text_files_are_documents_packed_with_eos(tmp_path: Path, tok: Tokenizer) -> None:
    a, b = _text(1, 40), " starts with a space\n\n\tand a tab, no final newline"
    (tmp_path / "a.txt").write_text(a, encoding="utf-8")
    (tmp_path / "b.txt").write_text(b, encoding="utf-8")
    cfg = _cfg(tmp_path, tok, train_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    blocks = load_blocks(cfg, tok, "train")
    stream = _stream(tok, [a, b])
    assert blocks.dtype == torch.int64 and blocks.shape == (len(stream) // 16, 16)
    assert torch.equal(blocks, _blocks(stream, 16))
    # each file is one document and round-trips exactly: EOS appears only at the ends of files
    flat = blocks.flatten().tolist()
    first_eos = flat.index(tok.eos_id)
    assert tok.decode(flat[:first_eos]) == a
    assert flat.count(tok.eos_id) == (2 if len(flat) == len(stream) else 1)


def test_jsonl_json_and_parquet_records_are_documents(tmp_path: Path, tok: Tokenizer) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [_text(s, 3) for s in range(12)]
    rows = [{"body": d, "n": i} for i, d in enumerate(docs[:4])] + [
        {"body": "", "n": 4},
        {"body": None, "n": 5},
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in docs[4:8]]))
    pq.write_table(pa.table({"body": docs[8:], "n": list(range(4))}), tmp_path / "c.parquet")
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.parquet")]
    blocks = load_blocks(_cfg(tmp_path, tok, train_files=files, text_field="body"), tok, "train")
    # empty and null records are skipped (no lone EOS)
    assert torch.equal(blocks, _blocks(_stream(tok, docs), 16))


def test_compressed_files_read_like_plain_ones(tmp_path: Path, tok: Tokenizer) -> None:
    import gzip
    import lzma

    docs = [_text(s, 4) for s in range(6)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d}) + "\n" for d in docs[:3]))
    with lzma.open(tmp_path / "b.txt.xz", "wt") as f:
        f.write(docs[3])
    files = [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.txt.xz")]
    blocks = load_blocks(_cfg(tmp_path, tok, train_files=files), tok, "train")
    assert torch.equal(blocks, _blocks(_stream(tok, [*docs[:3], docs[3]]), 16))


def test_big_files_are_cut_into_pieces_at_line_boundaries(
    tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _text(20, 300)
    docs = [_text(s, 3) for s in range(40)]
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    monkeypatch.setattr(data_files, "PIECE_BYTES", 700)
    monkeypatch.setattr(data_files, "BATCH_BYTES", 300)
    cfg = _cfg(tmp_path, tok, train_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")])
    blocks = load_blocks(cfg, tok, "train")
    shards = list((tmp_path / "cache" / "store" / "shards").glob("*.json"))
    assert len(shards) > 10  # both files were split
    assert torch.equal(blocks, _blocks(_stream(tok, [text, *docs]), 16))  # the same ids as whole files


def test_big_parquet_files_are_cut_into_runs_of_row_groups(
    tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big parquet file is tokenised in parallel pieces of whole row groups, in the file's order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [_text(s, 2) for s in range(60)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "big.parquet", row_group_size=7)  # 9 groups
    whole = load_blocks(
        _cfg(tmp_path / "whole", tok, train_files=[str(tmp_path / "big.parquet")]), tok, "train"
    )
    shards_dir = tmp_path / "whole" / "cache" / "store" / "shards"
    assert len(list(shards_dir.glob("*.json"))) == 1  # below PIECE_BYTES: one piece, named as before
    monkeypatch.setattr(data_files, "PIECE_BYTES", 700)
    pieces = data_files.file_pieces(tmp_path / "big.parquet", "parquet", "text", "data.train_files")
    assert len(pieces) > 2 and [p.row_groups for p in pieces][0][0] == 0
    assert all(a.row_groups[1] == b.row_groups[0] for a, b in zip(pieces, pieces[1:]))  # type: ignore[index]
    assert pieces[-1].row_groups[1] == 9 and pieces[-1].last and not pieces[0].last  # type: ignore[index]
    cfg = _cfg(tmp_path / "cut", tok, train_files=[str(tmp_path / "big.parquet")], num_proc=2)
    cut = load_blocks(cfg, tok, "train")  # pieces tokenised by 2 worker processes
    assert len(list((tmp_path / "cut" / "cache" / "store" / "shards").glob("*.json"))) == len(pieces)
    assert torch.equal(cut, whole)
    assert torch.equal(cut, _blocks(_stream(tok, docs), 16))  # every row once, in order


def test_globs_expand_sorted_and_format_can_be_forced(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "shards" / "sub").mkdir(parents=True)
    texts = {"shards/b.txt": _text(2, 20), "shards/a.txt": _text(3, 20), "shards/sub/c.txt": _text(4, 20)}
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    cfg = _cfg(tmp_path, tok, train_files=[str(tmp_path / "shards" / "**" / "*.txt")])
    order = [texts["shards/a.txt"], texts["shards/b.txt"], texts["shards/sub/c.txt"]]
    assert torch.equal(load_blocks(cfg, tok, "train"), _blocks(_stream(tok, order), 16))
    (tmp_path / "notes.bin").write_bytes(b"\xff\xfe" + order[0].encode("utf-16-le"))
    with pytest.raises(
        UserError, match=r"'.*notes\.bin' has an extension .* is not UTF-8 text; set data\.format"
    ):
        load_blocks(_cfg(tmp_path, tok, train_files=[str(tmp_path / "notes.bin")]), tok, "train")


def test_source_files_of_any_extension_are_text_when_they_read_as_utf8(
    tmp_path: Path, tok: Tokenizer
) -> None:
    code = {
        "a.py": "def f(x):\n    return x + 1  # é\n",
        "b.rs": 'fn main() { println!("hi"); }\n',
        "LICENSE": _text(9, 40),
    }
    for name, text in code.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    files = [str(tmp_path / name) for name in code]
    # every file one document, in the order listed, exactly as with data.format: text
    expected = _blocks(_stream(tok, list(code.values())), 16)
    assert torch.equal(load_blocks(_cfg(tmp_path, tok, train_files=files), tok, "train"), expected)
    forced = _cfg(tmp_path, tok, train_files=files, format="text", cache_dir=str(tmp_path / "cache2"))
    assert torch.equal(load_blocks(forced, tok, "train"), expected)


def test_a_glob_skips_empty_files_with_a_count(
    tmp_path: Path, tok: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _text(21, 30)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(text, encoding="utf-8")
    for name in ("b.txt", "c.txt"):
        (tmp_path / "d" / name).write_bytes(b"")
    blocks = load_blocks(_cfg(tmp_path, tok, train_files=[str(tmp_path / "d" / "*.txt")]), tok, "train")
    assert torch.equal(blocks, _blocks(_stream(tok, [text]), 16))
    assert "data.train_files: skipped 2 empty file(s)" in capsys.readouterr().err


def test_val_split_by_fraction_holds_out_the_tail(tmp_path: Path, tok: Tokenizer) -> None:
    text = _text(5, 200)
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    cfg = _cfg(tmp_path, tok, train_files=[str(tmp_path / "a.txt")], val_fraction=0.1)
    train, val = load_blocks(cfg, tok, "train"), load_blocks(cfg, tok, "val")
    every = _blocks(_stream(tok, [text]), 16)
    n_val = round(len(every) * 0.1)
    assert n_val >= 2 and len(val) == n_val
    assert torch.equal(train, every[:-n_val]) and torch.equal(val, every[-n_val:])


def test_val_split_by_files(tmp_path: Path, tok: Tokenizer) -> None:
    a, v = _text(6, 60), _text(7, 30)
    (tmp_path / "a.txt").write_text(a, encoding="utf-8")
    (tmp_path / "v.txt").write_text(v, encoding="utf-8")
    cfg = _cfg(tmp_path, tok, train_files=[str(tmp_path / "a.txt")], val_files=[str(tmp_path / "v.txt")])
    assert torch.equal(load_blocks(cfg, tok, "train"), _blocks(_stream(tok, [a]), 16))  # nothing held out
    assert torch.equal(load_blocks(cfg, tok, "val"), _blocks(_stream(tok, [v]), 16))
    # the val split does not read the train files (`moe-lm eval --data` works without them)
    eval_only = _cfg(
        tmp_path, tok, train_files=[str(tmp_path / "gone.txt")], val_files=[str(tmp_path / "v.txt")]
    )
    assert torch.equal(load_blocks(eval_only, tok, "val"), _blocks(_stream(tok, [v]), 16))


def _write_bad(tmp_path: Path, case: str) -> tuple[dict[str, Any], str]:
    """Files for one bad-input case: (data config overrides, the file the error must name)."""
    p = tmp_path / "bad"
    if case == "missing":
        return {"train_files": [str(tmp_path / "missing.txt")]}, "missing.txt"
    if case == "no_match":
        return {"train_files": [str(tmp_path / "nope" / "*.jsonl")]}, "nope/*.jsonl"
    if case == "directory":
        return {"train_files": [str(tmp_path)]}, str(tmp_path)
    if case in ("empty", "binary", "latin1", "too_short", "val_too_short"):
        data = {"empty": b"", "binary": b"\x00\x01\x02ELF" * 50, "latin1": b"caf\xe9\n" * 20}.get(case)
        p = p.with_suffix(".txt")
        p.write_bytes(data if data is not None else b"the king\n")
        if case == "val_too_short":
            (tmp_path / "ok.txt").write_text(_text(8, 50), encoding="utf-8")
            return {"train_files": [str(tmp_path / "ok.txt")], "val_files": [str(p)]}, "data.val_files"
        return {"train_files": [str(p)]}, "bad.txt" if case != "too_short" else "data.train_files"
    p = p.with_suffix(".jsonl")
    p.write_text(
        {
            "no_field": '{"content": "hello"}\n',
            "not_json": '{"text": "hello"}\n{"text": \n',
            "not_text": '{"text": 3}\n',
            "all_empty": '{"text": ""}\n{"text": null}\n',
        }[case]
    )
    return {"train_files": [str(p)]}, "bad.jsonl" if case != "all_empty" else "data.train_files"


BAD = {
    "missing": r"file '.*' not found; check the path",
    "no_match": r"no file matches '.*'; check the path or the glob",
    "directory": r"is a directory; list its files or use a glob",
    "empty": r"is empty; remove it from data.train_files",
    "binary": r"is binary \(NUL bytes\)",
    "latin1": r"is not UTF-8 text \(byte 3.*convert it to UTF-8",
    "too_short": r"yields \d+ tokens, fewer than one block of seq_len\+1 = 16; add data or lower data.seq_len",
    "val_too_short": r"yields \d+ tokens, fewer than one block",
    "no_field": r"has no field 'text' \(.*fields: content\); set data.text_field",
    "not_json": r"cannot read '.*' as JSON or JSON Lines .*set data.format",
    "not_text": r"field 'text' of '.*' holds int .*not text; set data.text_field",
    "all_empty": r"no text in field 'text' \(every record is empty or null\)",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_user_error(tmp_path: Path, tok: Tokenizer, case: str) -> None:
    data, names = _write_bad(tmp_path, case)
    with pytest.raises(UserError, match=BAD[case]) as e:
        load_blocks(_cfg(tmp_path, tok, **data), tok, "val" if case == "val_too_short" else "train")
    assert names in str(e.value) and "\n" not in str(e.value)
    # nothing half-built looks complete: every shard in the store has its manifest, no temporaries
    shards = tmp_path / "cache" / "store" / "shards"
    names_on_disk = {p.name for p in shards.glob("*")} if shards.exists() else set()
    assert not any(".tmp-" in n for n in names_on_disk)
    assert {n.rsplit(".", 1)[0] for n in names_on_disk} == {
        n[:-5] for n in names_on_disk if n.endswith(".json")
    }


def test_val_split_errors(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "a.txt").write_text(_text(9, 8), encoding="utf-8")
    one_block = len(_stream(tok, [_text(9, 8)]))  # seq_len + 1: the file makes exactly one block
    files = [str(tmp_path / "a.txt")]
    few = _cfg(tmp_path, tok, train_files=files, seq_len=one_block - 1, val_fraction=0.01)
    with pytest.raises(UserError, match="yields 1 block.* too few to hold out val_fraction = 0.01; add data"):
        load_blocks(few, tok, "train")
    no_val = _cfg(tmp_path, tok, train_files=files, seq_len=one_block - 1)
    assert len(load_blocks(no_val, tok, "train")) == 1
    assert open_data(no_val, tok).val == {}  # val_fraction 0 and no val_files: no validation set


def test_store_is_reused_and_follows_changes(
    tmp_path: Path, tok: Tokenizer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from moe_lm.data import store

    path = tmp_path / "a.txt"
    path.write_text(_text(10, 100), encoding="utf-8")
    cfg = _cfg(tmp_path, tok, train_files=[str(path)], val_fraction=0.1)
    first = load_blocks(cfg, tok, "train")
    assert "1 shard(s) to tokenise" in capsys.readouterr().out

    calls: list[str] = []
    real = store.write_shard

    def counting(job: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(Path(job.piece.path).name)
        return real(job, *args, **kwargs)

    monkeypatch.setattr("moe_lm.data.prepare.write_shard", counting)
    assert torch.equal(load_blocks(cfg, tok, "train"), first)
    assert len(load_blocks(cfg, tok, "val")) > 0
    assert calls == [] and capsys.readouterr().out == ""  # read from the store, nothing re-tokenised
    # the hold-out and seq_len are applied when reading: changing them re-tokenises nothing
    n_all = len(first) + len(load_blocks(cfg, tok, "val"))
    more_val = _cfg(tmp_path, tok, train_files=[str(path)], val_fraction=0.3)
    assert torch.equal(load_blocks(more_val, tok, "train"), first[: n_all - round(n_all * 0.3)])
    shorter = _cfg(tmp_path, tok, train_files=[str(path)], seq_len=7, val_fraction=0.1)
    assert len(load_blocks(shorter, tok, "train")) > len(first) and calls == []
    # adding a file tokenises only that file
    (tmp_path / "b.txt").write_text(_text(12, 30), encoding="utf-8")
    both = _cfg(tmp_path, tok, train_files=[str(path), str(tmp_path / "b.txt")])
    load_blocks(both, tok, "train")
    assert calls == ["b.txt"]
    path.write_text(_text(11, 100), encoding="utf-8")  # new content: its shard is stale and rebuilt
    changed = load_blocks(cfg, tok, "train")
    assert calls == ["b.txt", "a.txt"] and not torch.equal(changed[:4], first[:4])


def test_only_the_main_process_prepares(tmp_path: Path, tok: Tokenizer) -> None:
    (tmp_path / "a.txt").write_text(_text(12, 50), encoding="utf-8")
    cfg = _cfg(tmp_path, tok, train_files=[str(tmp_path / "a.txt")])
    barriers: list[int] = []
    with pytest.raises(UserError, match="was not built .*; see the main process's error"):
        load_blocks(cfg, tok, "train", is_main=False, barrier=lambda: barriers.append(1))
    assert barriers == [1] and not (tmp_path / "cache").exists()  # a non-main process never prepares
    main = load_blocks(cfg, tok, "train", is_main=True, barrier=lambda: barriers.append(1))
    other = load_blocks(cfg, tok, "train", is_main=False, barrier=lambda: barriers.append(1))
    assert torch.equal(main, other) and barriers == [1, 1, 1]
    # a failing prepare still reaches the barrier, so the other ranks do not hang
    (tmp_path / "e.txt").write_bytes(b"")
    bad = _cfg(tmp_path, tok, train_files=[str(tmp_path / "e.txt")])
    with pytest.raises(UserError, match="is empty"):
        load_blocks(bad, tok, "train", barrier=lambda: barriers.append(1))
    assert barriers == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# The loader

N, L = 23, 5


def _ids_blocks() -> torch.Tensor:
    # block i holds i*L ... i*L+L-1, so a batch's first column identifies its blocks
    return torch.arange(N * L, dtype=torch.int32).view(N, L)


def _ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // L).tolist()


def test_batches_shift_labels_and_cover_each_epoch_once() -> None:
    loader = ResumableLoader(_ids_blocks(), micro_batch_size=4, seed=3)
    assert loader.batches_per_epoch == N // 4
    seen = []
    for _ in range(loader.batches_per_epoch):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, L - 1)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
        seen += _ids(x)
    assert len(set(seen)) == len(seen) == 20 and loader.epoch == 0
    x, _ = loader.next_batch()
    assert loader.epoch == 1 and _ids(x) != seen[:4]  # a new permutation each epoch
    again = ResumableLoader(_ids_blocks(), micro_batch_size=4, seed=3)
    assert _ids(again.next_batch()[0]) == seen[:4]
    assert _ids(ResumableLoader(_ids_blocks(), micro_batch_size=4, seed=4).next_batch()[0]) != seen[:4]


def test_ranks_are_disjoint_and_together_equal_one_big_batch() -> None:
    ranks = [
        ResumableLoader(_ids_blocks(), micro_batch_size=3, dp_rank=r, dp_size=2, seed=1) for r in range(2)
    ]
    single = ResumableLoader(_ids_blocks(), micro_batch_size=6, seed=1)
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == single.batches_per_epoch == 3
    per_rank: list[list[int]] = [[], []]
    for _ in range(3):
        parts = [_ids(r.next_batch()[0]) for r in ranks]
        assert sorted(parts[0] + parts[1]) == sorted(_ids(single.next_batch()[0]))
        for r in range(2):
            per_rank[r] += parts[r]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(set(per_rank[0])) == 9


@pytest.mark.parametrize("k", [1, 4, 7])  # mid-epoch, exactly at the epoch end (4 per epoch), next epoch
def test_resume_is_bit_identical(k: int) -> None:
    # rank 1 of 2: 11 blocks per rank, 4 batches of 3 per epoch, so 7 more batches cross an epoch
    ref = ResumableLoader(_ids_blocks(), micro_batch_size=3, dp_rank=1, dp_size=2, seed=7)
    for _ in range(k):
        ref.next_batch()
    state = ref.state_dict()
    expected = [ref.next_batch() for _ in range(7)]
    restored = ResumableLoader(_ids_blocks(), micro_batch_size=3, dp_rank=1, dp_size=2, seed=999)
    restored.load_state_dict(state)
    assert restored.seed == 7 and restored.epoch == state["epoch"]
    for (x, y), (ex, ey) in zip((restored.next_batch() for _ in range(7)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert ref.epoch > state["epoch"]


def test_resume_guards() -> None:
    state = ResumableLoader(_ids_blocks(), micro_batch_size=2).state_dict()
    with pytest.raises(UserError, match=r"source 'corpus' had 23 training blocks, now 22\)"):
        ResumableLoader(_ids_blocks()[:22], micro_batch_size=2).load_state_dict(state)
    with pytest.raises(UserError, match=r"23 blocks, fewer than one batch of train.micro_batch_size 12 × 2"):
        ResumableLoader(_ids_blocks(), micro_batch_size=12, dp_size=2)


def test_drop_last_false_keeps_a_short_batch() -> None:
    loader = ResumableLoader(_ids_blocks(), micro_batch_size=4, drop_last=False)
    sizes = [len(loader.next_batch()[0]) for _ in range(loader.batches_per_epoch)]
    assert sizes == [4, 4, 4, 4, 4, 3]


def test_eval_batches_fixed_order_and_sharded() -> None:
    blocks = _ids_blocks()
    ranks = [[_ids(x) for x, _ in eval_batches(blocks, 4, r, 2)] for r in range(2)]
    assert ranks[0] == [[0, 2, 4, 6], [8, 10, 12, 14], [16, 18, 20]]
    assert ranks[1] == [[1, 3, 5, 7], [9, 11, 13, 15], [17, 19, 21]]  # block 22 dropped: equal counts
    assert [_ids(x) for x, _ in eval_batches(blocks, 4, 0, 2)] == ranks[0]
    assert len(list(eval_batches(blocks, 4, max_batches=2))) == 2
    with pytest.raises(
        UserError, match="validation split has 1 blocks, fewer than the 2 data-parallel ranks"
    ):
        eval_batches(blocks[:1], 4, 0, 2)


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4])
def test_eval_batches_counts_batches_of_all_ranks(dp_size: int) -> None:
    # max_batches is global: any number of ranks evaluates the same blocks as one process.
    blocks = _ids_blocks()
    ranks = [list(eval_batches(blocks, 2, r, dp_size, max_batches=6)) for r in range(dp_size)]
    seen = sorted(i for batches in ranks for x, _ in batches for i in _ids(x))
    assert seen == list(range(12))
    assert len({len(batches) for batches in ranks}) == 1  # equal counts keep collectives matched
