"""How the moe_lm train step (fwd + bwd, no optimizer) scales with sequence length and expert count.

1. Sequence length 128 ... 2048 at a fixed number of tokens per step (batch = tokens / seq): the
   growth over the 128 row is attention's quadratic term; everything else costs the same per token.
2. Experts 8 ... 64 at fixed active parameters (top-k and expert size fixed, so total parameters
   grow with E), against the dense model of the same active size (every FFN a SwiGLU of width
   k * I): ideal MoE / dense is 1.0 for every E. The optimizer is left out because its cost grows
   with total, not active, parameters.

    python scripts/bench_scaling.py            # CPU default, ~2 minutes
    python scripts/bench_scaling.py --quick
    python scripts/bench_scaling.py --device cuda --dtype bf16 --tokens 32768 --seqs 512,1024,2048,4096,8192
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch
from _bench_common import DTYPES, header, markdown_table, set_threads, time_alternating

from moe_lm.config import ModelConfig
from moe_lm.model.transformer import MoETransformer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step")
    p.add_argument("--seqs", default="128,256,512,1024,2048")
    p.add_argument("--experts", default="8,16,32,64")
    p.add_argument("--seq-for-experts", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (busy machine)"
    )
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.tokens, a.seqs, a.experts, a.seq_for_experts, a.layers, a.vocab, a.rounds = (
            512,
            "128,256",
            "8,16",
            128,
            2,
            1024,
            2,
        )
    return a


def base_config(a: argparse.Namespace, seq: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_layers=a.layers,
        num_heads=8, num_kv_heads=4, max_seq_len=seq, num_experts=8, top_k=a.top_k,
    )  # fmt: skip


def fwd_bwd(cfg: ModelConfig, a: argparse.Namespace, seq: int) -> Callable[[], None]:
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(device=a.device, dtype=DTYPES[a.dtype]).train()
    run = torch.compile(model) if a.compile else model
    ids = torch.randint(0, cfg.vocab_size, (max(1, a.tokens // seq), seq), device=a.device)

    def step() -> None:
        run(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def median_ms(fns: dict[str, Callable[[], None]], a: argparse.Namespace) -> dict[str, float]:
    secs = time_alternating(fns, rounds=a.rounds, warmup=1, device=a.device, clock_kind=a.clock)
    return {k: v * 1e3 for k, v in secs.items()}


def seq_table(a: argparse.Namespace) -> str:
    seqs = [int(s) for s in a.seqs.split(",")]
    ms = median_ms({str(s): fwd_bwd(base_config(a, s), a, s) for s in seqs}, a)
    first = ms[str(seqs[0])]
    rows = []
    for s in seqs:
        t = ms[str(s)]
        tokens = max(1, a.tokens // s) * s
        rows.append([s, tokens // s, f"{t:.0f}", f"{tokens / t * 1e3:,.0f}", f"{t / first:.2f}"])
    return markdown_table(["seq len", "batch", "step ms", "tokens/s", f"vs seq {seqs[0]}"], rows)


def experts_table(a: argparse.Namespace) -> str:
    seq = a.seq_for_experts
    cfg = base_config(a, seq)
    dense = dataclasses.replace(
        cfg, intermediate_size=a.intermediate * a.top_k, first_dense_layers=a.layers
    )  # every layer dense: the same active FFN size
    counts = [int(e) for e in a.experts.split(",")]
    fns = {"dense": fwd_bwd(dense, a, seq)}
    fns.update({str(e): fwd_bwd(dataclasses.replace(cfg, num_experts=e), a, seq) for e in counts})
    ms = median_ms(fns, a)
    rows = [["dense", "-", f"{ms['dense']:.0f}", "1.00", "-"]]
    first = ms[str(counts[0])]
    for e in counts:
        t = ms[str(e)]
        rows.append([str(e), f"{e * 3 * a.hidden * a.intermediate * a.layers / 1e6:.1f}M", f"{t:.0f}",
                     f"{t / ms['dense']:.2f}", f"{t / first:.2f}"])  # fmt: skip
    return markdown_table(
        ["experts", "expert params", "step ms", "vs dense", f"vs {counts[0]} experts"], rows
    )


def main() -> None:
    a = parse_args()
    set_threads(a.threads)
    print(header(a.device))
    print(
        f"hidden {a.hidden}, expert intermediate {a.intermediate}, {a.layers} layers, top-{a.top_k}, vocab "
        f"{a.vocab}; {a.tokens} tokens per step; fwd + bwd (no optimizer); {a.dtype} on {a.device}"
        f"{', compiled' if a.compile else ''}; median of {a.rounds} rounds, {a.clock} clock\n"
    )
    print(f"## Step time vs sequence length (8 experts, {a.tokens} tokens per step)\n")
    print(seq_table(a))
    print(
        f"\n## Step time vs number of experts (top-{a.top_k}, fixed active parameters, seq {a.seq_for_experts})\n"
    )
    print(experts_table(a))


if __name__ == "__main__":
    main()
