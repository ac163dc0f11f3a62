"""`moe-lm stats`: argument parsing only; the work is in moe_lm.analysis."""

from __future__ import annotations

from moe_lm.errors import ArgumentParser


def stats_main(argv: list[str]) -> int:
    from moe_lm.analysis.expert_load import load_table, write_stats
    from moe_lm.analysis.records import load_records, moe_layers_of

    p = ArgumentParser(
        prog="moe-lm stats",
        description="Expert-load heatmaps (PNG) of the latest record and of load over time.",
    )
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT")
    p.add_argument("--out", required=True, metavar="DIR")
    args = p.parse_args(argv)
    for path in write_stats(args.path, args.out):
        print(f"wrote {path}")
    records = load_records(args.path)
    if records.latest and records.latest.get("expert_load"):
        print(f"expert load at step {records.latest.get('step', '?')}:")
        print(load_table(records.latest["expert_load"], moe_layers_of(records)))
    return 0
