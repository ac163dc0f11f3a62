"""`moe-lm routing` end to end: an EP=2 checkpoint against a direct computation with the model, the
same numbers from its transformers export, the model card linking the figures, and bad input."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from moe_lm.analysis.routing import read_tokens, token_blocks
from moe_lm.cli import main
from moe_lm.config import config_from_dict
from moe_lm.data.tokenizer import Tokenizer
from moe_lm.model import MoETransformer
from tests.integration.conftest import run_config_dict
from tests.integration.test_hf_export import INIT_STD, make_checkpoint

SEQ, MAX_TOKENS = 32, 1500


@pytest.fixture(scope="module")
def run(
    corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, MoETransformer]:
    root = tmp_path_factory.mktemp("routing")
    cfg = config_from_dict(run_config_dict(corpus, tokenizer_dir, root / "run", model={"init_std": INIT_STD}))
    ckpt, model = make_checkpoint(root / "run", cfg, ep_size=2)  # experts in two files, by EP rank
    (root / "sums.txt").write_text("\n".join(f"{i} + {3 * i} = {4 * i}" for i in range(400)))
    return ckpt, model


def _data(run: tuple[Path, MoETransformer], corpus: Path) -> list[str]:
    root = run[0].parents[2]
    return ["--data", f"verse={corpus}", f"sums={root / 'sums.txt'}"]


def _routing(path: Path, out: Path, data: list[str], *extra: str) -> int:
    args = ["routing", str(path), *data, "--out", str(out), "--seq-len", str(SEQ)]
    return main([*args, "--max-tokens", str(MAX_TOKENS), *extra])


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_routing_of_an_ep2_checkpoint_equals_a_direct_computation(
    run: tuple[Path, MoETransformer], corpus: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, model = run
    out = ckpt.parents[1] / "routing"
    assert _routing(ckpt.parents[1], out, _data(run, corpus), "--layers", "1", "0") == 0
    assert "| uniform random | 25.0% | 83.3% |" in capsys.readouterr().out  # E=4, k=2
    tok = Tokenizer.load(tokenizer_dir)
    rows = _csv(out / "expert_shares.csv")
    for name, files in (("verse", [str(corpus)]), ("sums", [str(ckpt.parents[2] / "sums.txt")])):
        counts = torch.zeros(2, 4, dtype=torch.long)
        with torch.no_grad():
            for block in token_blocks(read_tokens(name, files, tok, MAX_TOKENS), SEQ):
                counts += model.eval()(block[None]).expert_counts_LE
        got = {
            (int(r["layer"]), int(r["expert"])): int(r["assignments"]) for r in rows if r["dataset"] == name
        }
        assert got == {(layer, e): int(counts[layer, e]) for layer in range(2) for e in range(4)}
    reps = _csv(out / "repetition.csv")
    assert {r["random_either_of_k"] for r in reps} == {f"{1 - 1 / 6:.6f}"}  # E=4, k=2: 1 - C(2,2)/C(4,2)
    assert (out / "routing_passage.html").stat().st_size > 1000
    assert (out / "expert_shares.png").stat().st_size > 5000


def test_a_transformers_export_gives_the_same_numbers(
    run: tuple[Path, MoETransformer], corpus: Path, tmp_path: Path
) -> None:
    ckpt, _ = run
    hf = tmp_path / "hf"
    assert main(["export", str(ckpt), "--out", str(hf), "--dtype", "fp32"]) == 0
    assert _routing(ckpt, tmp_path / "ours", _data(run, corpus)) == 0
    assert _routing(hf, tmp_path / "theirs", _data(run, corpus)) == 0
    for name in ("expert_shares.csv", "repetition.csv"):
        assert (tmp_path / "ours" / name).read_text() == (tmp_path / "theirs" / name).read_text()


def test_the_export_card_links_the_figures(
    run: tuple[Path, MoETransformer], corpus: Path, tmp_path: Path
) -> None:
    ckpt, _ = run
    analysis = tmp_path / "analysis"
    assert _routing(ckpt, analysis, _data(run, corpus)) == 0
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out), "--routing", str(analysis)]) == 0
    card = (out / "README.md").read_text()
    assert "## Routing" in card
    for link in ("routing/expert_shares.png", "routing/routing_passage.png", "routing/routing_passage.html"):
        assert f"({link})" in card and (out / link).is_file()
    assert "| uniform random |" in card
    # By default the export looks in RUN/routing; a checkpoint whose run has none gets no section.
    assert _routing(ckpt, ckpt.parents[1] / "routing", _data(run, corpus)) == 0
    assert main(["export", str(ckpt), "--out", str(tmp_path / "found")]) == 0
    assert "## Routing" in (tmp_path / "found" / "README.md").read_text()
    alone = tmp_path / "alone" / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, alone)
    assert main(["export", str(alone), "--out", str(tmp_path / "plain")]) == 0
    assert "## Routing" not in (tmp_path / "plain" / "README.md").read_text()
    assert main(["export", str(alone), "--out", str(tmp_path / "x"), "--routing", str(tmp_path)]) == 2


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--data", "a={corpus}", "a={corpus}"], "the data set name 'a' is given twice"),
        (["--data", "a={empty}"], "--data a: no text in"),
        (["--data", "a={corpus}", "--layers", "2"], "layer 2 is out of range; the model has 2 layers (0-1)"),
        (["--data", "a={corpus}", "--layers", "x"], "'x' is not a layer index"),
        (["--data", "a"], "is not NAME=FILE"),
        (["--data", "a={corpus}", "--passage", "b"], "no data set named 'b'"),
        (["--data", "a={tmp}/nothing.txt"], "--data a: file '{tmp}/nothing.txt' not found; check the path"),
        (["--data", "a={blob}"], "is binary (NUL bytes), not text"),  # NUL is valid UTF-8: caught up front
    ],
)
def test_bad_input_is_one_line_exit_2(
    run: tuple[Path, MoETransformer],
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    says: str,
) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.txt").write_bytes(b"weights\0\0\x01\0" * 64)
    fill = {"corpus": corpus, "empty": tmp_path / "empty.txt", "blob": tmp_path / "blob.txt", "tmp": tmp_path}
    argv = ["routing", str(run[0]), *[a.format(**fill) for a in args], "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says.format(**fill) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
