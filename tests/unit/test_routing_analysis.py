"""Routing analysis: the random baselines against exhaustive enumeration, repetition counting by
hand, the recorder against the model's own counts (padding included), and `analyse` against a
direct computation on the same tokens."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from moe_lm.analysis.routing import (
    EOS_MARK,
    analyse,
    parse_data_args,
    random_repetition,
    read_tokens,
    repetition_table,
    token_pieces,
)
from moe_lm.analysis.routing_figures import _lines, write_report
from moe_lm.errors import UserError
from moe_lm.model import MoETransformer
from moe_lm.model.routing_record import RoutingTally, record_routing, repetitions
from tests.conftest import tiny_model_config


@pytest.mark.parametrize(("experts", "k"), [(2, 1), (4, 1), (4, 2), (5, 2), (6, 3), (8, 2)])
def test_random_baselines_equal_exhaustive_enumeration(experts: int, k: int) -> None:
    # Uniform random routing: each token's choices are a uniformly random ordered k-tuple of
    # distinct experts, independent of its neighbour's. Count every pair of tuples exactly.
    tuples = list(itertools.permutations(range(experts), k))
    first = either = 0
    for a, b in itertools.product(tuples, repeat=2):
        first += a[0] == b[0]
        either += bool(set(a) & set(b))
    total = len(tuples) ** 2
    got_first, got_either = random_repetition(experts, k)
    assert Fraction(first, total) == Fraction(1, experts)
    assert got_first == pytest.approx(float(Fraction(first, total)), abs=1e-15)
    assert got_either == pytest.approx(float(Fraction(either, total)), abs=1e-15)


def test_random_baselines_of_mixtral_are_the_papers() -> None:
    first, either = random_repetition(8, 2)
    assert round(100 * first, 1) == 12.5 and round(100 * either) == 46  # Table 5's "uniform" row
    assert either == pytest.approx(13 / 28)


def test_repetitions_by_hand() -> None:
    # one sequence, k=2: (0,1) (0,2) (3,2) (4,5) -> pairs 3; first agrees once; share an expert twice
    idx = torch.tensor([[[0, 1], [0, 2], [3, 2], [4, 5]]])
    assert repetitions(idx) == (3, 1, 2)
    # the third token is padding: only the first pair counts
    real = torch.tensor([[True, True, False, True]])
    assert repetitions(idx, real) == (1, 1, 1)
    # pairs never cross sequences
    assert repetitions(torch.tensor([[[0, 1]], [[0, 1]]]).view(2, 1, 2)) == (0, 0, 0)


def test_recorder_matches_the_models_counts_with_padding() -> None:
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_config(init_std=0.3)).eval()
    ids = torch.randint(0, 128, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad(), record_routing(model, keep=True) as record:
        out = model(ids, attention_mask=mask)
    for tally, counts_E, kept in zip(record.tallies, out.expert_counts_LE, record.kept):
        assert torch.equal(tally.assignments_E, counts_E)
        assert tally.tokens == int(mask.sum())
        idx = kept[0]
        assert (idx[1, 8:] == -1).all() and (idx[1, :8] >= 0).all()
        assert tally.pairs == 2 * 11 + 7
    # hooks are gone afterwards
    assert not any(layer._forward_pre_hooks for layer in model.moe_layers)


def test_tally_round_trips_as_one_vector() -> None:
    tally = RoutingTally(4)
    tally.add(torch.tensor([[[0, 1], [0, 2], [3, 2]]]), None)
    back = RoutingTally.from_tensor(tally.as_tensor() * 2, 4)
    assert back.assignments_E.tolist() == [4, 2, 4, 2] and back.pairs == 4 and back.first_repeats == 2


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


class _Chars:
    """A one-character-per-token codec (ids = code points, EOS = 0)."""

    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 127 or 1 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != 0)


def test_analyse_equals_a_direct_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_config(init_std=0.3, num_layers=3))
    a = _write(tmp_path, "a.txt", "the quick brown fox jumps over the lazy dog\n" * 5)
    b = _write(tmp_path, "b.jsonl", '{"text": "1+1=2"}\n{"text": "22*3=66"}\n' * 8)
    codec = _Chars()
    report = analyse(model, codec, {"prose": [a], "sums": [b]}, layers=[2, 0], seq_len=32, batch_size=3)
    assert report.layers == [2, 0]
    for name, path in (("prose", a), ("sums", b)):
        ids = read_tokens(name, [path], codec, 65_536)
        blocks = [ids[i : i + 32] for i in range(0, len(ids), 32)]
        want = [torch.zeros(2 * 8 + 3, dtype=torch.long) for _ in range(3)]
        for block in blocks:  # one sequence at a time: batching and a short last block must not matter
            with torch.no_grad(), record_routing(model) as record:
                model(torch.tensor([block]))
            for w, t in zip(want, record.tallies):
                w += t.as_tensor()
        for w, got in zip(want, report.tallies[name]):
            assert torch.equal(w, got.as_tensor())
        assert report.tallies[name][0].tokens == len(ids)
    # JSON records end with EOS; a text file is one document ending with one
    assert read_tokens("sums", [b], codec, 1000).count(0) == 16
    assert len(read_tokens("sums", [b], codec, 100)) == 100
    assert read_tokens("prose", [a], codec, 10**6)[-1] == 0
    assert report.passage is not None and report.passage.name == "prose"
    assert "".join(report.passage.pieces).startswith("the quick brown fox")
    assert report.passage.choices[0].shape == (160, 2)


def test_bad_data_arguments_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="given twice"):
        parse_data_args(["a=x.txt", "a=y.txt"])
    for bad in ("noequals", "=x.txt", "a="):
        with pytest.raises(UserError, match="is not NAME=FILE"):
            parse_data_args([bad])
    empty = _write(tmp_path, "empty.txt", "")
    blank = _write(tmp_path, "blank.jsonl", '{"text": ""}\n')
    for files in ([empty], [blank], [empty, blank]):
        with pytest.raises(UserError, match="no text") as info:
            read_tokens("e", files, _Chars(), 100)
        assert "\n" not in str(info.value)


def test_layers_out_of_range_or_dense_are_refused(tmp_path: Path) -> None:
    model = MoETransformer(tiny_model_config(first_dense_layers=1, num_layers=3))
    data = {"a": [_write(tmp_path, "a.txt", "some text")]}
    with pytest.raises(UserError, match="layer 3 is out of range; the model has 3 layers"):
        analyse(model, _Chars(), data, layers=[3])
    with pytest.raises(UserError, match="layer -1 is out of range"):
        analyse(model, _Chars(), data, layers=[-1])
    with pytest.raises(UserError, match="layer 0 is a dense layer; its MoE layers are 1-2"):
        analyse(model, _Chars(), data, layers=[0])
    with pytest.raises(UserError, match="no data set named 'b'"):
        analyse(model, _Chars(), data, passage="b")
    assert analyse(model, _Chars(), data).layers == [1, 2]  # first, middle, last MoE layer


def test_token_pieces_keep_multibyte_characters_whole() -> None:
    class Bytes:
        eos_id = 0

        def encode(self, text: str) -> list[int]:
            return list(text.encode())

        def decode(self, ids: list[int]) -> str:
            return bytes(ids).decode(errors="replace").replace("\ufffd", "")

    ids = Bytes().encode("né")
    pieces = token_pieces(Bytes(), ids)
    assert "".join(pieces) == "né" and pieces == ["n", "", "é"]


def test_lines_wrap_and_break_at_newlines() -> None:
    lines = _lines(["ab", "c\nd", "e" * 5], width=4)
    # a token that does not fit moves to the next line; one longer than a line is cut
    assert lines == [[(0, 0, "ab"), (1, 2, "c")], [(1, 0, "d")], [(2, 0, "eeee")], [(2, 0, "e")]]


def test_report_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_config(init_std=0.3))
    data = {
        "x": [_write(tmp_path, "x.txt", "abc abd abe\n" * 20)],
        "y": [_write(tmp_path, "y.txt", "<>&\"' 12")],
    }
    report = analyse(model, _Chars(), data, seq_len=16, passage="y")
    written = {p.name for p in write_report(report, tmp_path / "out", "a test model")}
    assert written == {
        "expert_shares.png",
        "expert_shares.csv",
        "repetition.csv",
        "repetition.md",
        "routing_passage.html",
        "routing_passage.png",
        "routing.json",
    }
    rows = (tmp_path / "out" / "expert_shares.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 8  # data sets x MoE layers x experts
    for name in ("x", "y"):
        for layer in (0, 1):
            shares = [float(r.split(",")[3]) for r in rows[1:] if r.startswith(f"{name},{layer},")]
            assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    page = (tmp_path / "out" / "routing_passage.html").read_text()
    assert page.count("<h2>layer") == 2 and "expert 7" in page and "<script" not in page
    assert all(f">{c}</span>" in page for c in ("&lt;", "&gt;", "&amp;", "&quot;"))  # escaped
    assert report.passage is not None and report.passage.pieces[-1] == EOS_MARK
    table = repetition_table(report)
    assert table.splitlines()[-1].startswith("| uniform random | 12.5% | 46.4%")
    assert math.isfinite(report.tally("y", 0).first_repeat_rate())
