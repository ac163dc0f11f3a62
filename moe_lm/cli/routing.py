"""`moe-lm routing`: argument parsing and model loading; the analysis is in moe_lm.analysis.routing.

A moe_lm run or checkpoint (any expert-parallel size) loads with every expert in one process; a
transformers Mixtral folder is converted in memory through moe_lm.hf.importing (the analysis layer
sits below hf, so the command hands it the model).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from moe_lm.errors import ArgumentParser, UserError


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="moe-lm routing",
        description="Expert shares per data set, consecutive-token repetition against random routing, "
        "and a passage coloured by expert (the Mixtral paper's routing analysis).",
    )
    p.add_argument(
        "path", metavar="RUN_OR_CHECKPOINT", help="a run, a checkpoint, or a transformers Mixtral folder"
    )
    p.add_argument(
        "--data",
        action="extend",
        nargs="+",
        required=True,
        metavar="NAME=FILES",
        help="a named data set: NAME=FILE[,FILE...] (text, JSON(L), parquet; globs); repeatable",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--layers", nargs="+", metavar="N", help="model layers to show (default: first, middle, last MoE)"
    )
    p.add_argument(
        "--passage",
        metavar="NAME",
        help="data set whose beginning is shown token by token (default: the first)",
    )
    p.add_argument("--passage-tokens", type=int, default=160, metavar="N")
    p.add_argument("--max-tokens", type=int, default=65_536, metavar="N", help="tokens read per data set")
    p.add_argument(
        "--seq-len", type=int, default=None, metavar="N", help="tokens per sequence (default: the run's)"
    )
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer dir (default: the run's, or the folder's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _layers(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    out = []
    for item in ",".join(values).split(","):
        if item.strip():
            try:
                out.append(int(item))
            except ValueError:
                raise UserError(f"--layers: '{item}' is not a layer index (e.g. --layers 0,15,31)") from None
    return out


def _is_hf_folder(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and not (path / "config.yaml").is_file()
        and not (path / "checkpoints").is_dir()
    )


def _load(path: str, tokenizer: str | None, device: str) -> tuple[Any, Any, Any, str]:
    """(config, model, tokenizer, what was analysed)."""
    if _is_hf_folder(Path(path)):
        from moe_lm.hf.importing import load_hf_model

        cfg, model, codec = load_hf_model(path, tokenizer)
        return cfg, model.to(device), codec, f"transformers folder {path}"
    from moe_lm.data.tokenizer import Tokenizer
    from moe_lm.hf.export import find_tokenizer
    from moe_lm.state.resolve import resolve_checkpoint
    from moe_lm.state.weights import load_pretrained

    ckpt = resolve_checkpoint(path)
    cfg, model = load_pretrained(ckpt, device)
    tok_dir = find_tokenizer(cfg, ckpt, tokenizer)
    if tok_dir is None:
        raise UserError(f"no tokenizer at '{cfg.data.tokenizer}' (data.tokenizer); pass --tokenizer DIR")
    return cfg, model, Tokenizer.load(tok_dir), f"{ckpt}"


def routing_main(argv: list[str]) -> int:
    from moe_lm.analysis.routing import analyse, parse_data_args, repetition_table
    from moe_lm.analysis.routing_figures import write_report

    args = _parser().parse_args(argv)
    datasets = parse_data_args(args.data)  # bad names fail before any model loads
    layers = _layers(args.layers)
    for flag, value in (
        ("--passage-tokens", args.passage_tokens),
        ("--max-tokens", args.max_tokens),
        ("--batch-size", args.batch_size),
    ):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    cfg, model, codec, analysed = _load(args.path, args.tokenizer, args.device)
    seq_len = args.seq_len or cfg.data.seq_len
    if not 1 <= seq_len <= cfg.model.max_seq_len:
        raise UserError(f"--seq-len {seq_len} must be between 1 and the model's {cfg.model.max_seq_len}")

    def progress(total: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, desc="routing", unit="seq", file=sys.stderr, dynamic_ncols=True)

    report = analyse(
        model,
        codec,
        datasets,
        layers,
        seq_len=seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        passage=args.passage,
        passage_tokens=args.passage_tokens,
        device=args.device,
        progress=progress,
    )
    for path in write_report(report, args.out, analysed):
        print(f"wrote {path}")
    print("consecutive tokens routed to the same expert:")
    print(repetition_table(report))
    return 0
