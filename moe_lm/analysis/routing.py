"""Routing analysis of a trained model on named data sets, after the Mixtral paper (Jiang et al.
2024, section 5): each expert's share of the routed tokens per layer and data set (its Fig. 7), how
often consecutive tokens keep an expert against uniform random routing (its Table 5), and a
passage coloured by each token's first-choice expert (its Fig. 8; routing_figures.py draws them).

The model is a single-process MoETransformer holding every expert: a moe_lm checkpoint of any
expert-parallel size loads that way (moe_lm.state.weights.load_pretrained), and `moe-lm routing`
converts a transformers Mixtral folder into one (moe_lm.hf.importing.load_hf_model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from moe_lm.data.files import check_file, file_format, file_pieces, read_piece, resolve_files
from moe_lm.errors import UserError
from moe_lm.model import MoETransformer
from moe_lm.model.routing_record import RoutingTally, record_routing

EOS_MARK = "</s>\n"  # how a document end shows in a passage (the token decodes to nothing)


class TextCodec(Protocol):
    """What the analysis needs of a tokenizer (moe_lm's, or a transformers one wrapped)."""

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def random_repetition(num_experts: int, top_k: int) -> tuple[float, float]:
    """Repetition rates of uniform random routing (each token's k experts a uniformly random
    ordered choice of distinct experts, independently of its neighbour): the first choices agree
    with probability 1/E; two random k-subsets are disjoint with probability C(E-k, k) / C(E, k)."""
    first = 1.0 / num_experts
    either = 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return first, either


def parse_data_args(specs: Sequence[str]) -> dict[str, list[str]]:
    """`NAME=FILE[,FILE...]` (files or globs) for each --data; names must be unique."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, files = spec.partition("=")
        name = name.strip()
        patterns = [f for f in files.split(",") if f.strip()]
        if not sep or not name or not patterns:
            raise UserError(f"--data {spec!r} is not NAME=FILE[,FILE...] (e.g. --data code=src/*.py.txt)")
        if name in out:
            raise UserError(
                f"--data: the data set name '{name}' is given twice; give each data set its own name"
            )
        out[name] = patterns
    if not out:
        raise UserError("no data set given; pass --data NAME=FILE[,FILE...] at least once")
    return out


def read_tokens(name: str, patterns: list[str], codec: TextCodec, max_tokens: int) -> list[int]:
    """The first `max_tokens` tokens of a data set: its documents in order, each followed by EOS
    (a plain-text file is one document; a JSON record or parquet row is one), as training reads them."""
    key = f"--data {name}"
    ids: list[int] = []
    for path in resolve_files(patterns, key):
        if path.stat().st_size == 0:
            continue
        fmt = file_format(path, "auto", key)
        check_file(path, fmt, "text", key)  # a binary file or a wrong schema: one line, before reading
        for piece in file_pieces(path, fmt, "text", key):
            for texts, whole_documents, _ in read_piece(piece):
                for text in texts:
                    ids += codec.encode(text)
                    if whole_documents:
                        ids.append(codec.eos_id)
                if len(ids) >= max_tokens:
                    return ids[:max_tokens]
        if fmt == "text":
            ids.append(codec.eos_id)
    if not any(i != codec.eos_id for i in ids):
        raise UserError(f"--data {name}: no text in {', '.join(patterns)}; give files that hold text")
    return ids[:max_tokens]


def token_blocks(ids: list[int], seq_len: int) -> list[torch.Tensor]:
    """Blocks of seq_len tokens; the last may be shorter (a small data set is not dropped)."""
    return [torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len) if ids[i : i + seq_len]]


def check_layers(model: MoETransformer, layers: Sequence[int] | None) -> list[int]:
    """Model layer indices to show: as given (each must be an MoE layer), or first, middle, last MoE."""
    moe = model.cfg.moe_layer_indices
    if not moe:
        raise UserError("the model has no MoE layer; there is no routing to analyse")
    if not layers:
        return sorted({moe[0], moe[len(moe) // 2], moe[-1]})
    n = model.cfg.num_layers
    for layer in layers:
        if not 0 <= layer < n:
            raise UserError(f"--layers: layer {layer} is out of range; the model has {n} layers (0-{n - 1})")
        if layer not in moe:
            raise UserError(f"--layers: layer {layer} is a dense layer; its MoE layers are {_ranges(moe)}")
    return list(dict.fromkeys(layers))


def _ranges(indices: list[int]) -> str:
    return (
        f"{indices[0]}-{indices[-1]}" if indices == list(range(indices[0], indices[-1] + 1)) else str(indices)
    )


@dataclass
class Passage:
    """A passage's tokens, their text, and each shown layer's choices [T, k]."""

    name: str
    pieces: list[str]
    choices: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class RoutingReport:
    num_experts: int
    top_k: int
    moe_layers: list[int]  # model layer index of each MoE layer
    layers: list[int]  # the layers the figures show
    tallies: dict[str, list[RoutingTally]]  # per data set, per MoE layer
    passage: Passage | None = None

    def tally(self, dataset: str, layer: int) -> RoutingTally:
        return self.tallies[dataset][self.moe_layers.index(layer)]


def token_pieces(codec: TextCodec, ids: list[int]) -> list[str]:
    """Each token's text: the growth of the decoded prefix, so bytes that only make a character
    together (byte fallback) land on the token that completes it."""
    pieces, before = [], ""
    for i in range(len(ids)):
        text = codec.decode(ids[: i + 1])
        pieces.append(text[len(before) :] if text.startswith(before) else text)
        before = text
    return pieces


@torch.no_grad()
def analyse(
    model: MoETransformer,
    codec: TextCodec,
    datasets: dict[str, list[str]],
    layers: Sequence[int] | None = None,
    seq_len: int = 256,
    max_tokens: int = 65_536,
    batch_size: int = 8,
    passage: str | None = None,
    passage_tokens: int = 160,
    device: str | torch.device = "cpu",
    progress: Any = None,
) -> RoutingReport:
    """Route every data set through `model` (eval mode, no jitter) and tally each MoE layer.
    `passage` (a data set name, default the first) gives the passage shown token by token.
    `progress(total)` may return a tqdm-like bar (update(n), close())."""
    shown = check_layers(model, layers)
    if passage is not None and passage not in datasets:
        raise UserError(f"--passage: no data set named '{passage}' (data sets: {', '.join(datasets)})")
    model.eval()
    tokens = {name: read_tokens(name, files, codec, max_tokens) for name, files in datasets.items()}
    blocks = {name: token_blocks(ids, seq_len) for name, ids in tokens.items()}
    bar = progress(sum(len(b) for b in blocks.values())) if progress else None
    report = RoutingReport(model.cfg.num_experts, model.cfg.top_k, model.cfg.moe_layer_indices, shown, {})
    for name, chunks in blocks.items():
        with record_routing(model) as record:
            for start in range(0, len(chunks), batch_size):
                batch = chunks[start : start + batch_size]
                for group in _same_length(batch):
                    model(torch.stack(group).to(device))
                if bar is not None:
                    bar.update(len(batch))
        report.tallies[name] = record.tallies
    if bar is not None:
        bar.close()
    source = passage or next(iter(datasets))
    ids = tokens[source][:passage_tokens]
    with record_routing(model, keep=True) as record:
        model(torch.tensor([ids], device=device))
    pieces = token_pieces(codec, ids)
    pieces = [EOS_MARK if i == codec.eos_id else p for i, p in zip(ids, pieces)]
    report.passage = Passage(source, pieces)
    for layer in shown:
        report.passage.choices[layer] = record.kept[report.moe_layers.index(layer)][0][0]
    return report


def _same_length(batch: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    full = [b for b in batch if len(b) == len(batch[0])]
    rest = [b for b in batch if len(b) != len(batch[0])]
    return [full] + [[b] for b in rest]


def write_csvs(report: RoutingReport, out: Path) -> list[Path]:
    """expert_shares.csv (every MoE layer) and repetition.csv (with the random baselines)."""
    shares, reps = out / "expert_shares.csv", out / "repetition.csv"
    rows = ["dataset,layer,expert,share,first_choice_share,assignments"]
    rep_rows = ["dataset,layer,tokens,pairs,first_choice,either_of_k,random_first_choice,random_either_of_k"]
    rand_first, rand_either = random_repetition(report.num_experts, report.top_k)
    for name, tallies in report.tallies.items():
        for layer, t in zip(report.moe_layers, tallies):
            total, tokens = max(int(t.assignments_E.sum()), 1), max(t.tokens, 1)
            for e in range(report.num_experts):
                a, f = int(t.assignments_E[e]), int(t.first_E[e])
                rows.append(f"{name},{layer},{e},{a / total:.6f},{f / tokens:.6f},{a}")
            rep_rows.append(
                f"{name},{layer},{t.tokens},{t.pairs},{t.first_repeat_rate():.6f},"
                f"{t.either_repeat_rate():.6f},{rand_first:.6f},{rand_either:.6f}"
            )
    shares.write_text("\n".join(rows) + "\n")
    reps.write_text("\n".join(rep_rows) + "\n")
    return [shares, reps]


def repetition_table(report: RoutingReport) -> str:
    """Markdown, one row per shown layer: per data set the first-choice and either-of-k repetition
    rates, then what uniform random routing gives (the Mixtral paper's Table 5)."""
    k = report.top_k
    either = "either of the 2" if k == 2 else f"any of the {k}"
    head = "| layer | " + " | ".join(f"{n}: first choice | {n}: {either}" for n in report.tallies) + " |"
    rows = [head, "|---" * (1 + 2 * len(report.tallies)) + "|"]
    for layer in report.layers:
        cells = []
        for name in report.tallies:
            t = report.tally(name, layer)
            cells += [f"{100 * t.first_repeat_rate():.1f}%", f"{100 * t.either_repeat_rate():.1f}%"]
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    first, any_k = random_repetition(report.num_experts, k)
    rows.append(
        "| uniform random | "
        + " | ".join([f"{100 * first:.1f}%", f"{100 * any_k:.1f}%"] * len(report.tallies))
        + " |"
    )
    return "\n".join(rows)
