"""`moe-lm data prepare CONFIG`: tokenise every source of a run config into the token store."""

from __future__ import annotations

from moe_lm.errors import ArgumentParser
from moe_lm.fsutil import DiskFullError


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def data_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="moe-lm data", description="Prepare the token store of a run config.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenise every source into the store (only what is missing)")
    p.add_argument("config", help="YAML run config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.num_proc=8")
    p.add_argument(
        "--verify", action="store_true", help="checksum every existing shard (rebuild damaged ones)"
    )
    args = parser.parse_args(argv)

    from moe_lm.config import load_config
    from moe_lm.data.prepare import prepare_sources, store_dir
    from moe_lm.data.sources import data_plan
    from moe_lm.data.tokenizer import Tokenizer, check_vocab, ensure_tokenizer

    cfg = load_config(args.config, args.overrides)
    tokenizer = Tokenizer.load(ensure_tokenizer(cfg))
    check_vocab(tokenizer, cfg.model.vocab_size)
    plan = data_plan(cfg)
    try:
        prepared = prepare_sources(cfg, tokenizer, plan.prepared(), rebuild_damaged=True, verify=args.verify)
    except DiskFullError as e:
        raise DiskFullError(
            f"{e}; the finished shards are kept: free space and run the same command again"
        ) from None
    block_len = cfg.data.seq_len + 1
    by_key = {src.spec.key: src for src in prepared}
    roles = [(spec, "train") for spec in plan.train] + [(spec, "validation") for spec in plan.val.values()]
    rows = [["source", "role", "shards", "documents", "tokens", f"blocks of {block_len}"]]
    notes: list[str] = []
    for spec, role in roles:
        if spec.streaming:
            rows.append([spec.name, "train (streaming)", "-", "-", "-", "-"])
            continue
        if spec.name in plan.holdout and role == "train":
            role += f" (val: last {plan.holdout[spec.name]:g})"
        src = by_key[spec.key]
        blocks = f"{src.tokens // block_len:,}"
        if spec.chat:  # conversations are packed whole, not cut: count the rows they fill
            from moe_lm.data.packing import packed_blocks

            packed = packed_blocks(
                store_dir(cfg) / "shards",
                src.names,
                src.manifests,
                block_len,
                tokenizer.eos_id,
                cfg.data.train_on or "assistant",
                cfg.data.too_long,
                spec.key,
            )
            blocks = f"{len(packed):,} packed"
            notes.append(packed.report.line())
        rows.append([spec.name, role, f"{len(src.names):,}", f"{src.documents:,}", f"{src.tokens:,}", blocks])
    print(_table(rows))
    for line in notes:
        print(line)
    print(f"store: {store_dir(cfg)} (tokenizer {tokenizer.fingerprint[:12]}, {tokenizer.vocab_size} tokens)")
    return 0


__all__ = ["data_main"]
