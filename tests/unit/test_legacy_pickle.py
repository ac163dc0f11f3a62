"""The restricted reader of pre-safetensors checkpoint files (moe_lm/state/legacy.py): every file it
refuses, hostile or damaged, is one UserError line, and nothing in a hostile file runs."""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moe_lm.errors import UserError
from moe_lm.state.legacy import load_pickle_safely


class RunsCode:
    """Unpickling this calls os.system: a file holding it must never be loaded."""

    marker: Path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def good_archive(path: Path) -> bytes:
    torch.save({"optimizer": {"w": {"exp_avg": torch.ones(3)}}, "step": 2}, path)
    return path.read_bytes()


def rewrite_archive(data: bytes, change: Callable[[str, bytes], bytes | None]) -> bytes:
    """The zip archive torch.save writes, each member through `change` (None drops it)."""
    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            body = change(name, src.read(name))
            if body is not None:
                dst.writestr(name, body)
    return out.getvalue()


HOSTILE: dict[str, Callable[[Path], None]] = {
    "torch-archive": lambda p: torch.save({"state": RunsCode()}, p),
    "plain-pickle": lambda p: p.write_bytes(pickle.dumps(RunsCode())),
    "pickle-protocol-0": lambda p: p.write_bytes(pickle.dumps(RunsCode(), protocol=0)),
}

DAMAGED: dict[str, Callable[[Path, bytes], bytes]] = {
    "empty": lambda p, good: b"",
    "text": lambda p, good: b"hello world\n",  # KeyError inside torch before
    "random-bytes": lambda p, good: bytes(range(256)) * 2,
    "truncated": lambda p, good: good[: len(good) // 2],
    "junk-data-pkl": lambda p, good: rewrite_archive(  # struct.error inside torch before
        good, lambda name, body: b"\x80\x02junk" if name.endswith("data.pkl") else body
    ),
    "storage-missing": lambda p, good: rewrite_archive(
        good, lambda name, body: None if "/data/" in name else body
    ),
}


@pytest.mark.parametrize("make", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_file_that_would_run_code_is_refused_in_one_line_and_nothing_runs(tmp_path: Path, make) -> None:
    RunsCode.marker = tmp_path / "PWNED"
    path = tmp_path / "rank0.pt"
    make(path)
    with pytest.raises(UserError) as info:
        load_pickle_safely(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert "nothing in it ran" in str(info.value) or "could run code, so it was not loaded" in str(info.value)
    assert not RunsCode.marker.exists()


@pytest.mark.parametrize("damage", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_file_is_one_line_whatever_torch_raises(tmp_path: Path, damage) -> None:
    path = tmp_path / "optim-ep0-of-1.pt"
    path.write_bytes(damage(path, good_archive(tmp_path / "good.pt")))
    with pytest.raises(UserError) as info:
        load_pickle_safely(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert "use an earlier" in str(info.value)


def test_a_directory_in_place_of_the_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "rank0.pt").mkdir()
    with pytest.raises(UserError, match="IsADirectoryError.*the checkpoint is damaged") as info:
        load_pickle_safely(tmp_path / "rank0.pt")
    assert "\n" not in str(info.value)


def test_torch_s_protocol_warning_is_not_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "rank0.pt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(UserError):
            load_pickle_safely(path)
    assert [str(w.message) for w in shown] == []


def test_plain_data_still_loads(tmp_path: Path) -> None:
    good_archive(tmp_path / "good.pt")
    loaded = load_pickle_safely(tmp_path / "good.pt")
    assert torch.equal(loaded["optimizer"]["w"]["exp_avg"], torch.ones(3)) and loaded["step"] == 2
