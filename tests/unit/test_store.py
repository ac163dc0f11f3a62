"""The token store: crash safety, incremental preparing, damaged and foreign shards, parallel
workers, id widths, and reading without the resident memory growing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from moe_lm.config import Config, config_from_dict
from moe_lm.data.blocks import StoreBlocks, TokenStream
from moe_lm.data.corpus import open_data
from moe_lm.data.files import FilePiece
from moe_lm.data.prepare import prepare_sources
from moe_lm.data.sources import data_plan
from moe_lm.data.store import ShardJob, token_dtype, write_shard
from moe_lm.data.tokenizer import Tokenizer, train_tokenizer
from moe_lm.errors import UserError
from tests.unit.test_data import _stream, _text

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root = tmp_path_factory.mktemp("store-tok")
    (root / "corpus.txt").write_text(_text(0, 500), encoding="utf-8")
    return Tokenizer.load(train_tokenizer([str(root / "corpus.txt")], 300, root / "tok"))


def _files(root: Path, n: int = 4) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"part{i}.txt").write_text(_text(100 + i, 120), encoding="utf-8")
    return [str(root / f"part{i}.txt") for i in range(n)]


def _cfg(cache: Path, tok: Tokenizer, files: list[str], **data: Any) -> dict[str, Any]:
    return {
        "model": {"vocab_size": 300},
        "data": {
            "train_files": files,
            "tokenizer": str(tok.path),
            "cache_dir": str(cache),
            "seq_len": 15,
            **data,
        },
    }


def _store_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "store" / "shards").glob("*.ids"))}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def _prepare(cfg: Config, tok: Tokenizer, **kw: Any) -> Any:
    return prepare_sources(cfg, tok, data_plan(cfg).prepared(), **kw)


def test_shards_hold_the_stream_with_documents_and_a_manifest(tmp_path: Path, tok: Tokenizer) -> None:
    files = _files(tmp_path / "in", 2)
    cfg = config_from_dict(_cfg(tmp_path / "cache", tok, files))
    (src,) = _prepare(cfg, tok)
    shard_dir = tmp_path / "cache" / "store" / "shards"
    stream: list[int] = []
    for name, manifest, path in zip(src.names, src.manifests, files):
        ids = np.fromfile(shard_dir / f"{name}.ids", dtype=np.uint16)
        expected = _stream(tok, [Path(path).read_text()])
        assert ids.tolist() == expected and manifest["dtype"] == "uint16"
        assert np.fromfile(shard_dir / f"{name}.docs", dtype=np.int64).tolist() == [len(expected)]
        assert manifest["tokens"] == len(expected) and manifest["max_id"] == max(expected)
        assert manifest["tokenizer"] == tok.fingerprint and manifest["input"]["path"] == str(
            Path(path).resolve()
        )
        stream += expected
    summary = json.loads((tmp_path / "cache" / "store" / "MANIFEST.json").read_text())
    assert summary["sources"]["data.train_files"]["tokens"] == len(stream)


def test_killed_prepare_leaves_no_complete_looking_shard_and_rerun_finishes(
    tmp_path: Path, tok: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _files(tmp_path / "in")
    data = _cfg(tmp_path / "cache", tok, files)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    env = {**os.environ, "MOE_LM_FAULT": "shard:3", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "moe_lm.cli", "data", "prepare", str(tmp_path / "c.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr  # SIGKILLed after shard 3's data, before its manifest
    shard_dir = tmp_path / "cache" / "store" / "shards"
    assert len(list(shard_dir.glob("*.json"))) == 2 and len(list(shard_dir.glob("*.ids"))) == 3
    cfg = config_from_dict(data)
    with pytest.raises(UserError, match="was not built"):  # another rank would not take it as done
        open_data(cfg, tok, is_main=False)

    from moe_lm.cli import main

    capsys.readouterr()
    assert main(["data", "prepare", str(tmp_path / "c.yaml")]) == 0
    assert "2 shard(s) to tokenise" in capsys.readouterr().out  # the third (incomplete) and the fourth
    clean = config_from_dict(_cfg(tmp_path / "clean", tok, files))
    _prepare(clean, tok)
    assert _store_bytes(tmp_path / "cache") == _store_bytes(tmp_path / "clean")


def test_a_killed_tokenising_worker_is_one_line_naming_its_file_and_a_rerun_finishes(
    tmp_path: Path, tok: Tokenizer, capsys: pytest.CaptureFixture[str]
) -> None:
    """With multiprocessing.Pool a SIGKILLed worker's job never came back: `data prepare` hung."""
    root = tmp_path / "in"
    root.mkdir()
    sizes = {"big": 200, "mid": 150, "small": 60}  # jobs go largest first
    files = []
    for i, (name, lines) in enumerate(sizes.items()):
        (root / f"{name}.txt").write_text(_text(200 + i, lines), encoding="utf-8")
        files.append(str(root / f"{name}.txt"))
    data = _cfg(tmp_path / "cache", tok, files, num_proc=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    # shard:2 kills a worker when it writes its second shard: only the worker that finishes first
    # gets a second job (the smallest file), so exactly one dies, and the other finishes its own.
    env = {**os.environ, "MOE_LM_FAULT": "shard:2", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moe_lm.cli", "data", "prepare", str(tmp_path / "c.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: a tokenising worker (pid ")
    assert f"was killed by SIGKILL while tokenising '{root / 'small.txt'}';" in lines[0]
    assert "the 2 shard(s) finished are kept: run the same command again to tokenise the other 1" in lines[0]
    assert "lower data.num_proc" in lines[0]
    shard_dir = tmp_path / "cache" / "store" / "shards"
    manifests = sorted(p.name.split("-")[0] for p in shard_dir.glob("*.json"))
    assert manifests == ["big.txt", "mid.txt"]  # the killed shard has its data files, no manifest
    assert len(list(shard_dir.glob("small.txt-*.ids"))) == 1

    from moe_lm.cli import main

    capsys.readouterr()
    assert main(["data", "prepare", str(tmp_path / "c.yaml")]) == 0
    assert "1 shard(s) to tokenise" in capsys.readouterr().out
    clean = config_from_dict(_cfg(tmp_path / "clean", tok, files))
    _prepare(clean, tok)
    assert _store_bytes(tmp_path / "cache") == _store_bytes(tmp_path / "clean")


def test_two_workers_write_the_same_store_as_one(tmp_path: Path, tok: Tokenizer) -> None:
    files = _files(tmp_path / "in")
    one = config_from_dict(_cfg(tmp_path / "one", tok, files))
    two = config_from_dict(_cfg(tmp_path / "two", tok, files, num_proc=2))
    a, b = _prepare(one, tok), _prepare(two, tok)
    assert _store_bytes(tmp_path / "one") == _store_bytes(tmp_path / "two")
    assert [m["files"]["ids"]["xxh3"] for m in a[0].manifests] == [
        m["files"]["ids"]["xxh3"] for m in b[0].manifests
    ]


def test_damaged_shards_are_errors_for_training_and_rebuilt_by_prepare(
    tmp_path: Path, tok: Tokenizer
) -> None:
    files = _files(tmp_path / "in", 2)
    cfg = config_from_dict(_cfg(tmp_path / "cache", tok, files))
    (src,) = _prepare(cfg, tok)
    good = _store_bytes(tmp_path / "cache")
    ids = tmp_path / "cache" / "store" / "shards" / f"{src.names[0]}.ids"

    ids.write_bytes(good[ids.name][:-6])  # truncated
    with pytest.raises(
        UserError, match=r"is damaged: .*\.ids has \d+ bytes, its manifest says \d+.*moe-lm data prepare"
    ):
        open_data(cfg, tok)
    _prepare(cfg, tok, rebuild_damaged=True)
    assert _store_bytes(tmp_path / "cache") == good

    stat = ids.stat()
    flipped = bytearray(good[ids.name])
    flipped[10] ^= 0xFF
    ids.write_bytes(bytes(flipped))  # same size, other bytes
    with pytest.raises(UserError, match=r"\.ids does not match its checksum") as e:
        open_data(cfg, tok)
    assert "\n" not in str(e.value)
    os.utime(ids, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old mtime back ...
    open_data(cfg, tok)  # ... the quick check passes, but a full verification finds it
    with pytest.raises(UserError, match="does not match its checksum"):
        _prepare(cfg, tok, verify=True)
    _prepare(cfg, tok, verify=True, rebuild_damaged=True)
    assert _store_bytes(tmp_path / "cache") == good


def test_a_shard_of_another_tokenizer_is_refused_and_kept(tmp_path: Path, tok: Tokenizer) -> None:
    files = _files(tmp_path / "in", 2)
    _prepare(config_from_dict(_cfg(tmp_path / "cache", tok, files)), tok)
    before = _snapshot(tmp_path / "cache")
    other = Tokenizer.load(train_tokenizer(files, 296, tmp_path / "other"))
    cfg = config_from_dict(_cfg(tmp_path / "cache", other, files))
    with pytest.raises(
        UserError, match=r"was made by another tokenizer .*set data.cache_dir to a new directory"
    ):
        open_data(cfg, other)
    with pytest.raises(UserError, match="another tokenizer"):
        _prepare(cfg, other, rebuild_damaged=True)
    assert _snapshot(tmp_path / "cache") == before  # nothing prepared was lost


def test_ids_beyond_the_model_vocabulary_are_refused(tmp_path: Path, tok: Tokenizer) -> None:
    files = _files(tmp_path / "in", 1)
    data = _cfg(tmp_path / "cache", tok, files)
    worst = max(_stream(tok, [Path(files[0]).read_text()]))
    data["model"]["vocab_size"] = worst  # one row short
    with pytest.raises(UserError, match=rf"token id {worst} ≥ model.vocab_size = {worst}"):
        open_data(config_from_dict(data), tok)


class _WideTokenizer:
    """Ids past 65,535 need uint32 shards (a 100k-token vocabulary)."""

    eos_id = 99_999
    fingerprint = "wide"

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[70_000 + ord(c) for c in t] for t in texts]


def test_wide_vocabularies_are_stored_as_uint32(tmp_path: Path) -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ab"}\n{"text": "c"}\n')
    piece = FilePiece(str(path), "json", "text", "x", 0, path.stat().st_size, True)
    job = ShardJob(piece, str(tmp_path), "wide", {"path": str(path)})
    manifest = write_shard(job, _WideTokenizer(), token_dtype(100_000))
    assert manifest["dtype"] == "uint32" and manifest["max_id"] == 99_999
    stream = TokenStream(tmp_path, ["wide"], [manifest])
    out = np.empty(5, np.int64)
    stream.read(0, 5, out)
    assert out.tolist() == [70_097, 70_098, 99_999, 70_099, 99_999]


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_reading_every_block_does_not_grow_resident_memory(tmp_path: Path) -> None:
    n = 12 << 20  # 12M tokens: 24 MiB of uint16 in two shards
    ids = (np.arange(n, dtype=np.int64) * 7 % 50_000).astype(np.uint16)
    half = n // 2 + 3
    ids[:half].tofile(tmp_path / "a.ids")
    ids[half:].tofile(tmp_path / "b.ids")
    manifests = [{"dtype": "uint16", "tokens": half}, {"dtype": "uint16", "tokens": n - half}]
    blocks = StoreBlocks(TokenStream(tmp_path, ["a", "b"], manifests), block_len=257)
    before = _rss_file_kib()
    for start in range(0, len(blocks), 512):
        idx = np.arange(start, min(start + 512, len(blocks)))
        got = blocks.read(idx)
        if start == 0 or start + 512 >= len(blocks) or start // 512 == (half // 257) // 512:
            assert np.array_equal(got, ids[idx[0] * 257 : (idx[-1] + 1) * 257].reshape(-1, 257))
    grown_kib = _rss_file_kib() - before
    assert grown_kib < 4096, f"file-backed resident memory grew by {grown_kib} KiB reading 24 MiB"
