"""What global-batch load balancing costs in one process: train steps (forward, backward, AdamW) of
the tiny-shakespeare shape with `model.aux_loss_scope` micro_batch and global_batch, with one
micro-batch per step (the counts are summed inside the pass: nothing extra in one process) and
with A accumulated micro-batches (a counting pass without autograd first). The global batch is
the same in every row; ratios are against micro_batch with the same accumulation.

    python scripts/bench_balance.py                    # CPU, ~1 minute
    python scripts/bench_balance.py --threads 1 --clock cpu   # on a busy machine
    python scripts/bench_balance.py --device cuda --batch 64 --seq 1024
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _bench_common import (
    header,
    keep_freed_memory,
    markdown_table,
    set_threads,
    time_alternating,
    tiny_model_config,
)

from moe_lm.model.balance import global_batch_step
from moe_lm.model.transformer import MoETransformer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step in the accumulated rows")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.batch, a.seq, a.rounds = 8, 32, 2
    return a


def step_fn(scope: str, accum: int, args: argparse.Namespace) -> Callable[[], None]:
    cfg = tiny_model_config(aux_loss_scope=scope)
    torch.manual_seed(0)
    model = MoETransformer(cfg).to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=args.device)
    micro = args.batch // accum
    batches = [
        (ids[i * micro : (i + 1) * micro, :-1], ids[i * micro : (i + 1) * micro, 1:]) for i in range(accum)
    ]

    def step() -> None:
        with global_batch_step(model, batches, lambda b: model.route_counts(b[0])):
            for x, y in batches:
                (model(x, y, return_logits=False).loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    print(header(args.device))
    print(keep_freed_memory())
    rows = []
    for accum in (1, args.accum):
        fns = {scope: step_fn(scope, accum, args) for scope in ("micro_batch", "global_batch")}
        times = time_alternating(fns, args.rounds, 2, args.device, args.clock)
        micro = times["micro_batch"]
        for scope, seconds in times.items():
            rows.append([f"{args.batch // accum} x {accum}", scope, 1000 * seconds, seconds / micro])
    print(f"\nglobal batch {args.batch} x {args.seq} tokens; {args.clock} clock, median of {args.rounds}\n")
    print(
        markdown_table(["micro-batch x accumulation", "aux_loss_scope", "ms / step", "vs micro_batch"], rows)
    )


if __name__ == "__main__":
    main()
