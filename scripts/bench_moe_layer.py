"""One MoE layer (fwd + bwd) against the dense SwiGLU FFN with the same active parameters.

The dense reference has intermediate size k * I_expert, so per token it does the same expert FLOPs
as the MoE layer: the ideal MoE/dense time ratio is 1.0 (plus the router, which is tiny). Top-k is
run at fixed active parameters: I_expert = active_intermediate / k.

"dispatch share" = 1 - (expert math alone) / (MoE layer): the expert math is Experts.forward on
rows already sorted by expert, with the same counts; the rest is router, losses, sort, gather and
the gate-weighted combine, forward and backward.

    python scripts/bench_moe_layer.py              # CPU default, ~2 minutes
    python scripts/bench_moe_layer.py --quick
    python scripts/bench_moe_layer.py --device cuda --dtype bf16 --tokens 4096,16384,65536
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _bench_common import DTYPES, header, keep_freed_memory, markdown_table, set_threads, time_alternating
from torch import nn

from moe_lm.config import ModelConfig
from moe_lm.model.dispatch import plan_routing
from moe_lm.model.layers import SwiGLU
from moe_lm.model.losses import imbalance
from moe_lm.model.moe import MoELayer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--active-intermediate", type=int, default=1024, help="k * expert intermediate size")
    p.add_argument("--tokens", default="1024,4096,16384")
    p.add_argument("--experts", default="8,16,64")
    p.add_argument("--top-k", default="2,8")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (0: by size)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (busy machine)"
    )
    p.add_argument("--compile", action="store_true")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings alone")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.tokens, a.experts, a.top_k, a.rounds = "1024", "8", "2", 2
    return a


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        out = module(x)
        if isinstance(out, tuple):  # MoE layer: a gradient through the router losses too, as in training
            stats = out[1]
            (out[0] * grad).sum().add(0.01 * stats.aux_loss + 0.001 * stats.z_loss).backward()
        else:
            out.backward(grad)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return run


def expert_math(layer: MoELayer, x_TH: torch.Tensor) -> Callable[[], None]:
    """fwd + bwd of the layer's experts alone, on rows already sorted by expert (same counts)."""
    with torch.no_grad():
        route = layer.router(x_TH)
        plan = plan_routing(route.topk_idx_TK, layer.num_experts, layer.capacity(x_TH.shape[0]))
    x_SH = x_TH[plan.token_idx].detach().requires_grad_()
    g_SH = torch.randn_like(x_SH)

    def run() -> None:
        layer.experts(x_SH, plan.counts_E).backward(g_SH)
        x_SH.grad = None
        for p in layer.experts.parameters():
            p.grad = None

    return run


def bench_one(a: argparse.Namespace, tokens: int, experts: int, k: int) -> list[object] | None:
    inter = a.active_intermediate // k
    if k > experts or inter == 0:
        return None
    cfg = ModelConfig(
        hidden_size=a.hidden, intermediate_size=inter, num_experts=experts, top_k=k, vocab_size=16,
        num_layers=1, num_heads=1, num_kv_heads=1,
    )  # fmt: skip
    dtype, dev = DTYPES[a.dtype], a.device
    torch.manual_seed(0)
    moe = MoELayer(cfg).to(dev)
    dense = SwiGLU(a.hidden, inter * k).to(dev)
    with torch.no_grad():
        for m in (moe, dense):
            for p in m.parameters():
                p.normal_(0.0, 0.02)
    moe, dense = moe.to(dtype), dense.to(dtype)
    x = torch.randn(tokens, a.hidden, device=dev, dtype=dtype, requires_grad=True)
    g = torch.randn(tokens, a.hidden, device=dev, dtype=dtype)
    comp: Callable[[nn.Module], nn.Module] = torch.compile if a.compile else (lambda m: m)  # type: ignore[assignment]
    fns = {
        "dense": fwd_bwd(comp(dense), x, g),
        "moe": fwd_bwd(comp(moe), x, g),
        "experts": expert_math(moe, x.detach()),
    }
    rounds = a.rounds or (5 if tokens <= 4096 else 3)
    t = time_alternating(fns, rounds=rounds, warmup=1, device=dev, clock_kind=a.clock)
    with torch.no_grad():
        load = imbalance(moe(x)[1].counts_E).item()
    flops = 6 * tokens * a.hidden * 3 * inter * k  # fwd + bwd of the three projections
    return [
        tokens, experts, k, inter,
        f"{t['dense'] * 1e3:.1f}", f"{t['moe'] * 1e3:.1f}", f"{t['moe'] / t['dense']:.2f}",
        f"{100 * (1 - t['experts'] / t['moe']):.0f}%", f"{load:.2f}", f"{flops / t['moe'] / 1e9:.0f}",
    ]  # fmt: skip


def main() -> None:
    a = parse_args()
    set_threads(a.threads)
    malloc = "allocator: default" if a.default_malloc else keep_freed_memory()
    print(header(a.device) + "\n" + malloc)
    print(
        f"hidden {a.hidden}, active intermediate {a.active_intermediate} (= k x expert intermediate), "
        f"{a.dtype} on {a.device}{', compiled' if a.compile else ''}; fwd + bwd; median of rounds, {a.clock} clock\n"
    )
    rows = []
    for tokens in (int(t) for t in a.tokens.split(",")):
        for k in (int(v) for v in a.top_k.split(",")):
            for e in (int(v) for v in a.experts.split(",")):
                row = bench_one(a, tokens, e, k)
                if row is not None:
                    rows.append(row)
    cols = ["tokens", "experts", "top-k", "I_expert", "dense ms", "MoE ms", "MoE / dense", "dispatch share",
            "max/mean load", "MoE GFLOP/s"]  # fmt: skip
    print(markdown_table(cols, rows))
    print("\nideal MoE / dense = 1.0; dispatch share = 1 - (experts on pre-sorted rows) / (MoE layer).")


if __name__ == "__main__":
    main()
