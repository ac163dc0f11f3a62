"""What the routing-health metrics cost, on the tiny-shakespeare shape (16 x 128 tokens):

- a train step (forward, backward, AdamW) computing the per-layer router entropy, against the same
  step with the entropy replaced by a constant;
- an evaluation forward with the routing recorder (hooks, counts, consecutive repetition) against
  one without;
- the metric's own work alone (every MoE layer's entropy; every layer's tally), timed over many
  repetitions, as a share of the step or forward: whole-step differences this small drown in the
  step's own variation.

    python scripts/bench_routing_metrics.py
    python scripts/bench_routing_metrics.py --threads 1 --clock cpu    # on a busy machine
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

import moe_lm.model.moe as moe_module
from moe_lm.model.losses import router_entropy
from moe_lm.model.routing_record import RoutingTally, record_routing
from moe_lm.model.transformer import MoETransformer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.batch, a.seq, a.rounds = 4, 32, 2
    return a


def build(args: argparse.Namespace) -> tuple[MoETransformer, torch.Tensor]:
    cfg = tiny_model_config()
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=args.device)
    return MoETransformer(cfg).to(args.device), ids


def train_step(entropy: bool, args: argparse.Namespace) -> Callable[[], None]:
    model, ids = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    real = moe_module.router_entropy

    def step() -> None:
        if not entropy:  # the same step without the metric
            moe_module.router_entropy = lambda probs: probs.new_zeros(())  # type: ignore[assignment]
        try:
            model.train()
            model(ids[:, :-1], ids[:, 1:], return_logits=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            moe_module.router_entropy = real

    return step


def eval_pass(recorded: bool, args: argparse.Namespace) -> Callable[[], None]:
    model, ids = build(args)

    @torch.no_grad()
    def run() -> None:
        model.eval()
        if recorded:
            with record_routing(model) as record:
                model(ids[:, :-1], ids[:, 1:])
            record.tallies[0].first_repeat_rate()
        else:
            model(ids[:, :-1], ids[:, 1:])

    return run


def metric_alone(args: argparse.Namespace) -> tuple[Callable[[], None], Callable[[], None]]:
    """(entropy of every MoE layer's router output, tally of every layer's choices) on one batch."""
    model, ids = build(args)
    with torch.no_grad(), record_routing(model, keep=True) as record:
        probs = []
        hooks = [
            m.router.register_forward_hook(lambda _, __, out: probs.append(out.probs_TE))
            for m in model.moe_layers
        ]
        model(ids[:, :-1])
        for h in hooks:
            h.remove()
    choices = [kept[0] for kept in record.kept]

    def entropy() -> None:
        for p in probs:
            router_entropy(p)

    def tally() -> None:
        for idx in choices:
            RoutingTally(model.cfg.num_experts).add(idx, None)

    return entropy, tally


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    print(header(args.device))
    print(keep_freed_memory())
    train = time_alternating(
        {"without": train_step(False, args), "with": train_step(True, args)},
        args.rounds,
        2,
        args.device,
        args.clock,
    )
    evals = time_alternating(
        {"without": eval_pass(False, args), "with": eval_pass(True, args)},
        args.rounds,
        2,
        args.device,
        args.clock,
    )
    rows = [
        [
            "train step: router entropy",
            1000 * train["without"],
            1000 * train["with"],
            train["with"] / train["without"],
        ],
        [
            "eval forward: repetition",
            1000 * evals["without"],
            1000 * evals["with"],
            evals["with"] / evals["without"],
        ],
    ]
    print(f"\n{args.batch} x {args.seq} tokens; {args.clock} clock, median of {args.rounds}\n")
    print(markdown_table(["", "ms without", "ms with", "ratio"], rows))
    entropy, tally = metric_alone(args)
    reps = 100
    alone = time_alternating(
        {
            "entropy": lambda: [entropy() for _ in range(reps)],
            "tally": lambda: [tally() for _ in range(reps)],
        },
        args.rounds,
        1,
        args.device,
        args.clock,
    )
    share = [
        ["router entropy", 1000 * alone["entropy"] / reps, alone["entropy"] / reps / train["without"]],
        ["routing tally", 1000 * alone["tally"] / reps, alone["tally"] / reps / evals["without"]],
    ]
    print()
    print(markdown_table(["metric work alone, every MoE layer", "ms", "share of the step / forward"], share))


if __name__ == "__main__":
    main()
