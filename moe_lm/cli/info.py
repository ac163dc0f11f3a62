"""`moe-lm info CONFIG [key=value ...] [--json]`: what a config builds, without building it.

Parameters are counted on the meta device (`moe_lm.model.params.count_params`), so the real
Mixtral 8x7B shape answers instantly and allocates nothing.

FLOPs per token are the ones MFU is measured with (`moe_lm.model.params.flops_per_token`):
forward = 2 * N_active, training = 6 * N_active, and the attention score/value matmuls, which grow
with context and are not in N, reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from moe_lm.config import Config, load_config
from moe_lm.errors import ArgumentParser


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="moe-lm info", description="Parameter counts (total / active) and the resolved config."
    )
    p.add_argument("config", help="YAML run config, e.g. configs/mixtral-8x7b.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as model.num_experts=16")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    return p


def summarize(cfg: Config) -> dict[str, Any]:
    """Counts, per-component shares, active ratio and FLOPs estimates for a resolved config."""
    # Imported here so that a bad config is reported before paying for `import torch` (~2 s).
    from moe_lm.model.params import count_params, flops_per_token

    m = cfg.model
    counts = count_params(m)
    total, active, components = counts.total_params, counts.active_params, counts.components
    # Only routed experts are partly active (k of E); every other component runs for every token.
    active_components = {
        name: (n * m.top_k // m.num_experts if name == "experts" else n) for name, n in components.items()
    }
    flops = flops_per_token(m, cfg.data.seq_len, active)
    return {
        "name": cfg.name,
        "total_params": total,
        "active_params": active,
        "active_ratio": active / total if total else 0.0,
        "components": components,
        "active_components": active_components,
        "moe_layers": len(m.moe_layer_indices),
        "dense_layers": m.num_layers - len(m.moe_layer_indices),
        "forward_flops_per_token": flops.forward,
        "train_flops_per_token": flops.train,
        "attention_train_flops_per_token": flops.attention_train,
        "seq_len": cfg.data.seq_len,
        "config": cfg.to_dict(),
    }


def _report(s: dict[str, Any], config_yaml: str) -> str:
    from moe_lm.model.params import human

    total, active = s["total_params"], s["active_params"]
    lines = [
        f"config: {s['name']}",
        f"total params:   {human(total):>9}  ({total:,})",
        f"active params:  {human(active):>9}  ({active:,}) per token",
        f"active ratio:   {s['active_ratio']:.1%}",
        f"layers:         {s['moe_layers']} MoE + {s['dense_layers']} dense",
        "",
        f"  {'component':<16}{'total':>12}{'% total':>9}{'active':>12}",
    ]
    for name, n in sorted(s["components"].items(), key=lambda kv: -kv[1]):
        share = n / total if total else 0.0
        lines.append(f"  {name:<16}{human(n):>12}{share:>9.1%}{human(s['active_components'][name]):>12}")
    lines += [
        "",
        f"FLOPs/token:    {human(s['forward_flops_per_token'])} forward (2 x active), "
        f"{human(s['train_flops_per_token'])} training (6 x active)",
        f"                + {human(s['attention_train_flops_per_token'])} training attention at "
        f"seq_len {s['seq_len']}",
        "",
        "resolved config:",
        config_yaml.rstrip(),
    ]
    return "\n".join(lines)


def info_main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help: argparse printed it; hand the code back instead of exiting
        return int(e.code or 0)
    cfg = load_config(args.config, args.overrides)
    summary = summarize(cfg)
    if args.json:
        print(json.dumps(summary))
    else:
        print(_report(summary, cfg.to_yaml()))
    sys.stdout.flush()
    return 0
