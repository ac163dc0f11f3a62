"""One MoE layer (fwd + bwd) of moe_lm against torchtitan, OLMo-core and transformers, in one run.

Every candidate computes the same function (softmax top-k renormalised, dropless, SwiGLU experts)
from the same weights, copied from one moe_lm layer; the parity table shows the largest |difference|
of outputs and gradients against moe_lm. The reference is a dense SwiGLU with the same active
parameters (intermediate k * I), so "ratio" is time / dense and 1.0 is the ideal. Peers that are
not installed are skipped, with the reason; scripts/_peers.py says which parts run as stand-ins.

Timing: all candidates of a row run in one process, one fwd + bwd each per round, in an order
shuffled every round (each with weights of its own), after warm-up; the median per candidate, by CPU time (this process) and by wall time.
OMP_WAIT_POLICY defaults to PASSIVE here: with OpenMP's default busy-wait, threads spinning between
parallel regions on a shared 2-core machine made the MoE layers swing up to 25x between rounds.

    python scripts/bench_peers.py                     # all shapes, 4k and 16k tokens, 1 and 2 threads
    python scripts/bench_peers.py --quick             # one shape, 4k tokens, 1 thread
    python scripts/bench_peers.py --tokens 4096 --threads 1 --peers moe_lm,torchtitan
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads OpenMP
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from _bench_common import (  # noqa: E402
    MIB,
    child_report,
    header,
    keep_freed_memory,
    markdown_table,
    peak_rss,
    reset_peak_rss,
    rss_supported,
    run_child,
    time_both_clocks,
)
from _peers import OPTIONAL, PEERS, Peer, build_peer  # noqa: E402

from moe_lm.config import ModelConfig  # noqa: E402
from moe_lm.model.layers import SwiGLU  # noqa: E402
from moe_lm.model.moe import MoELayer  # noqa: E402

DENSE = "dense"
SHAPES = "8x2x256x512,8x2x512x1024,64x8x256x128"  # experts x top-k x hidden x expert intermediate

warnings.filterwarnings("ignore", message=".*autocast.*")  # torchtitan's fp32 router autocast on CPU


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="comma list of EXPERTSxTOPKxHIDDENxINTER")
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--peers", default=",".join(PEERS), help=f"candidates; also: {', '.join(OPTIONAL)}")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (0: 5 up to 4k tokens, else 3)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings alone")
    p.add_argument("--quick", action="store_true", help="first shape, 4k tokens, 1 thread, 2 rounds")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.shapes, a.tokens, a.threads, a.rounds = a.shapes.split(",")[0], "4096", "1", 2
    if not a._child:
        check_args(a)
    return a


def check_args(a: argparse.Namespace) -> None:
    """Bad flags are one `error:` line and exit code 2, before anything is built."""
    known = PEERS + OPTIONAL
    problems = [
        f"--peers: unknown candidate {n!r}; known: {', '.join(known)}"
        for n in a.peers.split(",")
        if n and n not in known
    ]
    for flag, text, parts in (
        ("--shapes", a.shapes, 4),
        ("--tokens", a.tokens, 1),
        ("--threads", a.threads, 1),
    ):
        for item in text.split(","):
            fields = item.split("x")
            if len(fields) != parts or not all(f.isdigit() and int(f) > 0 for f in fields):
                what = "EXPERTSxTOPKxHIDDENxINTER, e.g. 8x2x256x512" if parts == 4 else "a positive integer"
                problems.append(f"{flag}: {item!r} is not {what}")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        raise SystemExit(2)


def shape_name(shape: tuple[int, int, int, int]) -> str:
    e, k, h, i = shape
    return f"E{e} top-{k}, H {h}, I {i}"


def build(
    shape: tuple[int, int, int, int], names: list[str]
) -> tuple[MoELayer, SwiGLU, dict[str, Peer | str]]:
    e, k, h, inter = shape
    cfg = ModelConfig(
        hidden_size=h, intermediate_size=inter, num_experts=e, top_k=k, vocab_size=16, num_layers=1,
        num_heads=1, num_kv_heads=1,
    )  # fmt: skip
    torch.manual_seed(0)
    ours, dense = MoELayer(cfg), SwiGLU(h, k * inter)
    with torch.no_grad():
        for m in (ours, dense):
            for p in m.parameters():
                p.normal_(0.0, 0.02)
    return ours, dense, {n: build_peer(n, ours) for n in names}


def fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module, x: torch.Tensor,
            g: torch.Tensor) -> Callable[[], None]:  # fmt: skip
    def run() -> None:
        forward(x).backward(g)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return run


def parity(peers: dict[str, Peer], x: torch.Tensor, g: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(max |Δ| output, max |Δ| over all gradients) of each candidate against moe_lm."""
    results = {}
    for name, peer in peers.items():
        xx = x.detach().clone().requires_grad_()
        for p in peer.module.parameters():
            p.grad = None
        y = peer.forward(xx)
        y.backward(g)
        assert xx.grad is not None
        results[name] = (y.detach().clone(), [xx.grad.clone(), *(t.clone() for t in peer.grads())])
        for p in peer.module.parameters():
            p.grad = None
    ref_y, ref_g = results["moe_lm"]
    return {
        n: (float((y - ref_y).abs().max()), max(float((a - b).abs().max()) for a, b in zip(gs, ref_g)))
        for n, (y, gs) in results.items()
    }


def child_main(a: argparse.Namespace) -> None:
    """One candidate, one shape, in a fresh process: peak RSS added by one fwd + bwd."""
    name, spec, tokens = a._child.split("|")
    shape = tuple(int(v) for v in spec.split("x"))
    ours, dense, peers = build(shape, [] if name == DENSE else [name])  # type: ignore[arg-type]
    torch.manual_seed(1)
    x = torch.randn(int(tokens), shape[2], requires_grad=True)
    g = torch.randn(int(tokens), shape[2])
    peer = peers.get(name)
    if isinstance(peer, str):
        child_report({"error": peer})
        return
    run = fwd_bwd(dense, dense, x, g) if peer is None else fwd_bwd(peer.forward, peer.module, x, g)
    gc.collect()
    base = reset_peak_rss()
    run()
    child_report({"base": base, "peak": peak_rss()})


def memory(a: argparse.Namespace, shape: tuple[int, ...], tokens: int, names: list[str]) -> dict[str, str]:
    spec = "x".join(map(str, shape))
    out = {}
    for name in [DENSE, *names]:
        r = run_child([os.path.abspath(__file__), "--_child", f"{name}|{spec}|{tokens}"])
        out[name] = r.get("error") or f"{(float(r['peak']) - float(r['base'])) / MIB:.0f}"  # type: ignore[arg-type]
    return out


def cell(secs: float, dense: float, best: bool) -> str:
    text = f"{secs * 1e3:,.0f} ({secs / dense:.2f})"
    return f"**{text}**" if best else text


def main() -> None:
    a = parse_args()
    if a._child:  # default allocator: kept freed blocks would count in the RSS high-water mark
        torch.set_num_threads(1)
        child_main(a)
        return
    malloc = "allocator: default" if a.default_malloc else keep_freed_memory()
    names = [n for n in a.peers.split(",") if n]
    if "moe_lm" not in names:
        names.insert(0, "moe_lm")  # the parity reference
    print(header("cpu") + "\n" + malloc)
    print("fwd + bwd of one MoE layer, fp32 on cpu; ms, and in parentheses the ratio to a dense SwiGLU "
          "with the same active parameters (1.00 = as fast as dense); bold: fastest MoE of the row\n")  # fmt: skip
    rows: dict[str, list[list[str]]] = {"cpu": [], "wall": []}
    parity_rows, memory_rows, skipped, notes = [], [], {}, {}
    cols: list[str] = []
    for spec in a.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        for ti, tokens in enumerate(int(t) for t in a.tokens.split(",")):
            ours, dense, built = build(shape, names)  # type: ignore[arg-type]
            peers = {n: p for n, p in built.items() if isinstance(p, Peer)}
            skipped.update({n: p for n, p in built.items() if isinstance(p, str)})
            notes.update({n: p.note for n, p in peers.items() if p.note})
            cols = [DENSE, *peers]
            torch.manual_seed(1)
            x = torch.randn(tokens, shape[2], requires_grad=True)
            g = torch.randn(tokens, shape[2])
            torch.set_num_threads(1)
            diffs = parity(peers, x, g)
            parity_rows.append(
                [shape_name(shape), tokens] + [f"{d[0]:.1e} / {d[1]:.1e}" for d in diffs.values()]
            )  # type: ignore[arg-type]
            fns = {DENSE: fwd_bwd(dense, dense, x, g)}
            fns.update({n: fwd_bwd(p.forward, p.module, x, g) for n, p in peers.items()})
            for threads in (int(t) for t in a.threads.split(",")):
                torch.set_num_threads(threads)
                rounds = a.rounds or (5 if tokens <= 4096 else 3)
                t = time_both_clocks(fns, rounds=rounds, warmup=1)
                print(f"# done: {shape_name(shape)}, {tokens} tokens, {threads} thread(s)", file=sys.stderr, flush=True)  # fmt: skip
                for clk in rows:
                    fastest = min((n for n in peers), key=lambda n: t[n][clk])
                    rows[clk].append(
                        [shape_name(shape), f"{tokens:,}", str(threads)]
                        + [cell(t[n][clk], t[DENSE][clk], n == fastest) for n in cols]
                        + [f"{min(t[n][clk] for n in peers if n != 'moe_lm' and not n.startswith('moe_lm ')) / t['moe_lm'][clk]:.2f}x"
                           if len([n for n in peers if not n.startswith("moe_lm")]) else "-"]
                    )  # fmt: skip
            if ti == 0 and not a.no_memory and rss_supported():
                mem = memory(a, shape, tokens, list(peers))
                memory_rows.append([shape_name(shape), tokens] + [mem[n] for n in cols])
            del ours, dense, built, peers, fns
            gc.collect()
    for clk, what in (("cpu", "CPU time of this process"), ("wall", "wall time")):
        print(f"\n## fwd + bwd ms, {what}\n")
        print(markdown_table(["shape", "tokens", "threads", *cols, "best peer / moe_lm"], rows[clk]))
    print("\n## Parity against moe_lm: max |Δ| output / max |Δ| over the input and weight gradients\n")
    print(markdown_table(["shape", "tokens", *cols[1:]], parity_rows))
    if memory_rows:
        print("\n## Peak extra memory of one fwd + bwd, MiB (RSS high-water of a fresh process, 1 thread)\n")
        print(markdown_table(["shape", "tokens", *cols], memory_rows))
    print()
    if any(n.startswith("torchtitan") for n in cols):
        print("- torchtitan: its GroupedExperts forward without the bf16 casts (fp32 torch._grouped_mm); "
              "as shipped it casts to bf16, ~14x slower on CPU: --peers torchtitan (bf16 as shipped)")  # fmt: skip
    for n, note in notes.items():
        print(f"- {n}: {note}")
    for n, why in skipped.items():
        print(f"- skipped {n}: {why}")
    print("- best peer / moe_lm > 1: moe_lm is faster than every other framework on that row")


if __name__ == "__main__":
    main()
