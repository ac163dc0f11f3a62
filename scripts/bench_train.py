"""Train-step throughput and peak memory: moe_lm against transformers' MixtralForCausalLM.

Both models get the same config, the same weights (a direct state-dict rename) and the same batch;
one step = forward + backward + AdamW step. transformers is run with every experts implementation
it offers (`set_experts_implementation`: "eager", "grouped_mm", "batched_mm"); one that fails or
runs out of memory on this device is skipped with the reason. transformers is run with
output_router_logits=True so that it trains with its load-balancing loss, as moe_lm does.

    python scripts/bench_train.py                   # CPU default: 8 x 256 tokens, ~2 minutes
    python scripts/bench_train.py --quick           # smoke test, seconds
    python scripts/bench_train.py --device cuda --dtype bf16 --compile --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

import torch
from _bench_common import (
    DTYPES,
    MIB,
    child_report,
    header,
    keep_freed_memory,
    markdown_table,
    peak_rss,
    reset_peak_rss,
    rss_supported,
    run_child,
    set_threads,
    sync,
    time_alternating,
)

os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_lm.config import ModelConfig  # noqa: E402
from moe_lm.model.transformer import MoETransformer  # noqa: E402

HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
OURS = "moe_lm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--steps", type=int, default=6, help="timed steps per implementation (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (after one step at build)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--impls", default=",".join(HF_IMPLS), help="transformers experts implementations to try")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (busy machine)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory runs")
    p.add_argument(
        "--train-malloc",
        action="store_true",
        help="time with make train's glibc settings (freed memory kept; both models benefit)",
    )
    p.add_argument(
        "--child-mem-gb",
        type=float,
        default=8.0,
        help="address-space cap of a CPU memory run (twice that for the timing process)",
    )
    p.add_argument("--quick", action="store_true", help="tiny config and few steps: a smoke test")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.vocab, args.layers, args.steps, args.warmup = 2, 64, 512, 2, 2, 1
    return args


def model_config(a: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        max_seq_len=a.seq,
        num_experts=a.experts,
        top_k=a.top_k,
    )


def hf_model(cfg: ModelConfig, impl: str, ours: MoETransformer) -> torch.nn.Module:
    """transformers' Mixtral with our weights, through the same conversion `moe-lm export` uses."""
    from transformers import MixtralForCausalLM

    from moe_lm.hf.convert import to_hf_config, to_hf_state_dict

    hc = to_hf_config(cfg)
    hc.output_router_logits = True  # so its aux loss is computed too, as ours is
    hc.use_cache = False
    model = MixtralForCausalLM(hc)
    # Cloned: both models train in this process and must not share storage.
    state = {k: v.detach().clone() for k, v in to_hf_state_dict(ours.state_dict(), cfg).items()}
    model.load_state_dict(state, strict=True)
    model.set_experts_implementation(impl)
    return model.train()


def build(kind: str, cfg: ModelConfig, a: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cpu"):
        ours = MoETransformer(cfg)  # the weights every candidate starts from
    model = ours if kind == OURS else hf_model(cfg, kind, ours)
    return model.to(device=a.device, dtype=DTYPES[a.dtype]).train()


def batch(cfg: ModelConfig, a: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels for moe_lm): moe_lm takes pre-shifted labels, transformers shifts inside."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids.to(a.device), labels.to(a.device)


def make_step(
    kind: str, model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], compile_: bool
) -> Callable[[], None]:
    ids, labels = data
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the trainer's optimizer, for both
    fwd = torch.compile(model) if compile_ else model

    def step() -> None:
        if kind == OURS:
            loss = fwd(ids, labels=labels, return_logits=False).loss  # as the trainer calls it
        else:
            loss = fwd(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


@torch.no_grad()
def parity(models: dict[str, torch.nn.Module], data: tuple[torch.Tensor, torch.Tensor]) -> list[list[Any]]:
    """Step-0 losses of every candidate: same model means same LM loss and same router aux loss."""
    ids, labels = data
    out = models[OURS](ids, labels=labels)
    ref_lm, ref_aux = out.lm_loss.float().item(), out.hf_aux_loss.float().item()
    rows: list[list[Any]] = [[OURS, f"{ref_lm:.6f}", "-", f"{ref_aux:.6f}", "-"]]
    for kind, m in models.items():
        if kind == OURS:
            continue
        o = m(input_ids=ids, labels=ids, use_cache=False)
        aux = o.aux_loss.float().item()
        coef: float = getattr(m, "config").router_aux_loss_coef  # noqa: B009 - nn.Module typing
        lm = o.loss.float().item() - coef * aux
        rows.append(
            [f"hf {kind}", f"{lm:.6f}", f"{abs(lm - ref_lm):.1e}", f"{aux:.6f}", f"{abs(aux - ref_aux):.1e}"]
        )
    return rows


def child_main(a: argparse.Namespace) -> None:
    """One candidate in a fresh process: report its peak RSS during training steps."""
    gb = int(a.child_mem_gb * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (gb, gb))  # a runaway candidate fails here, not the machine
    try:
        cfg = model_config(a)
        data = batch(cfg, a)
        model = build(a._child, cfg, a)
        step = make_step(a._child, model, data, a.compile)
        gc.collect()
        base = reset_peak_rss()
        for _ in range(2):  # the first step allocates optimizer state; the second shows steady peak
            step()
        child_report({"base": base, "peak": peak_rss()})
    except (RuntimeError, MemoryError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        child_report({"error": f"{type(e).__name__}: {msg[:150]}"})


def child_args(a: argparse.Namespace, kind: str) -> list[str]:
    argv = [a for a in sys.argv[1:] if a != "--no-memory"]
    return [os.path.abspath(__file__), *argv, "--_child", kind]


def cuda_peak(step: Callable[[], None]) -> int:
    """Peak allocated bytes during the second step (the first one creates the optimizer state)."""
    step()
    sync("cuda")
    torch.cuda.reset_peak_memory_stats()
    step()
    sync("cuda")
    return torch.cuda.max_memory_allocated()


def step_flops(cfg: ModelConfig, batch_size: int, seq: int) -> float:
    """Matmul FLOPs of one train step: 3 x forward (2 per multiply-add), causal attention halved."""
    hd, h = cfg.resolved_head_dim, cfg.hidden_size
    attn = h * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    ffn = cfg.num_experts * h + cfg.top_k * 3 * h * cfg.expert_intermediate_size
    per_token = cfg.num_layers * (attn + ffn) + h * cfg.vocab_size
    scores = cfg.num_layers * 2 * cfg.num_heads * seq * seq * hd * 0.5 * batch_size  # QK^T and PV
    return 3 * 2 * (per_token * batch_size * seq + scores)


def step_gemms(cfg: ModelConfig, tokens: int, seq: int) -> list[tuple[int, int, int, int]]:
    """(count, M, K, N) of every forward matmul of one step; experts get tokens * k / E rows each."""
    h, hd, layers = cfg.hidden_size, cfg.resolved_head_dim, cfg.num_layers
    rows = max(1, tokens * cfg.top_k // cfg.num_experts)
    inter = cfg.expert_intermediate_size
    per_layer = [
        (1, tokens, h, hd * (cfg.num_heads + 2 * cfg.num_kv_heads)),  # q, k, v projections
        (1, tokens, hd * cfg.num_heads, h),  # output projection
        (1, tokens, h, cfg.num_experts),  # router
        (cfg.num_experts, rows, h, 2 * inter),  # expert gate/up
        (cfg.num_experts, rows, inter, h),  # expert down
        # causal attention scores and values: half of [seq, hd] x [hd, seq] per (sequence, head)
        (tokens // seq * cfg.num_heads, seq // 2, hd, seq),
        (tokens // seq * cfg.num_heads, seq // 2, seq, hd),
    ]
    return [(c * layers, m, k, n) for c, m, k, n in per_layer] + [(1, tokens, h, cfg.vocab_size)]


def gemm_probe(
    cfg: ModelConfig, tokens: int, seq: int, device: str, dtype: torch.dtype, clock_kind: str
) -> float:
    """Seconds that the step's matmuls take as plain GEMMs, each alone on warm buffers.

    Every forward matmul [M, K] x [K, N] is timed with its two backward ones ([M, N] x [N, K] and
    [K, M] x [M, N]). What a step takes beyond this is everything else: attention softmax, norms,
    element-wise ops, routing, memory traffic between ops, the optimizer. The probe moves with the
    machine (BLAS build, cache sizes, other load), so the speed-up over transformers is printed
    beside it.
    """
    total, flops = 0.0, 0.0
    for count, m, k, n in step_gemms(cfg, tokens, seq):
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        g = torch.randn(m, n, device=device, dtype=dtype)
        fns = {
            "fwd": lambda a=a, b=b: torch.mm(a, b),
            "dA": lambda g=g, b=b: torch.mm(g, b.t()),
            "dB": lambda a=a, g=g: torch.mm(a.t(), g),
        }
        secs = time_alternating(fns, rounds=5, warmup=1, device=device, clock_kind=clock_kind)
        total += count * sum(secs.values())
        flops += count * 3 * 2 * m * k * n
    return total, flops


def cpu_memory(a: argparse.Namespace, kinds: list[str], skipped: dict[str, str]) -> dict[str, float]:
    """Train peak RSS (MiB) per candidate, each in a fresh process; failures go to `skipped`."""
    mem: dict[str, float] = {}
    for kind in kinds:
        r = run_child(child_args(a, kind))
        if "error" in r:
            skipped[kind] = str(r["error"])
        else:
            mem[kind] = (float(r["peak"]) - float(r["base"])) / MIB  # type: ignore[arg-type]
    return mem


def build_steps(
    a: argparse.Namespace, cfg: ModelConfig, kinds: list[str], data: tuple[torch.Tensor, torch.Tensor],
    skipped: dict[str, str], mem: dict[str, float], measure_mem: bool,
) -> dict[str, Callable[[], None]]:  # fmt: skip
    """A train-step closure per candidate that runs here; a failing one is skipped with its error."""
    steps: dict[str, Callable[[], None]] = {}
    for kind in kinds:
        if kind in skipped:
            continue
        try:
            steps[kind] = make_step(kind, build(kind, cfg, a), data, a.compile)
            if a.device == "cuda" and measure_mem:
                mem[kind] = cuda_peak(steps[kind]) / MIB
            else:
                steps[kind]()  # fails here rather than inside the timing loop
        except (RuntimeError, ValueError, MemoryError) as e:
            skipped[kind] = f"{type(e).__name__}: {str(e).strip()[:150]}"
            steps.pop(kind, None)
            gc.collect()
            if a.device == "cuda":
                torch.cuda.empty_cache()
    return steps


def report(
    a: argparse.Namespace,
    cfg: ModelConfig,
    secs: dict[str, float],
    mem: dict[str, float],
    skipped: dict[str, str],
) -> None:
    tokens = a.batch * a.seq
    flops = step_flops(cfg, a.batch, a.seq)
    best = min((k for k in secs if k != OURS), key=secs.__getitem__, default=None)
    rows = []
    for kind, s in secs.items():
        name = OURS if kind == OURS else f"hf {kind}" + (" (best)" if kind == best else "")
        m = f"{mem[kind]:.0f}" if kind in mem else "-"
        mratio = f"{mem[OURS] / mem[kind]:.2f}" if kind in mem and OURS in mem else "-"
        speed = f"{secs[kind] / secs[OURS]:.2f}x"  # >1: moe_lm faster
        rows.append(
            [name, f"{tokens / s:,.0f}", f"{s * 1e3:.0f}", f"{flops / s / 1e9:.0f}", speed, m, mratio]
        )
    mem_what = "peak alloc MiB" if a.device == "cuda" else "train peak RSS MiB"
    print("\n## Train step (fwd + bwd + AdamW)\n")
    cols = ["model", "tokens/s", "step ms", "GFLOP/s", "moe_lm speed-up", mem_what, "moe_lm mem / this"]
    print(markdown_table(cols, rows))
    for kind, why in skipped.items():
        print(f"- skipped {'hf ' if kind != OURS else ''}{kind}: {why}")
    if best is not None:
        ratio_m = f"{mem[OURS] / mem[best]:.2f}x" if OURS in mem and best in mem else "-"
        print(
            f"\nmoe_lm / best transformers ({best}): {secs[best] / secs[OURS]:.2f}x tokens/s, {ratio_m} peak memory"
        )
    probe, probe_flops = gemm_probe(cfg, tokens, a.seq, a.device, DTYPES[a.dtype], a.clock)
    print(
        f"GEMM probe: the step's {probe_flops / 1e9:.1f} GFLOP of matmuls, run alone as plain GEMMs, take "
        f"{probe * 1e3:.0f} ms here ({probe_flops / probe / 1e9:.0f} GFLOP/s); a step takes "
        + ", ".join(f"{'hf ' if k != OURS else ''}{k} {secs[k] / probe:.2f}x" for k in secs)
        + " that. The speed-up over transformers depends on the machine: compare it with this probe."
    )
    if a.device == "cpu":
        print(
            "memory: RSS high-water of a fresh process per model during 2 steps, minus RSS after "
            "building it (grads + AdamW state + activations)."
        )


def main() -> None:
    a = parse_args()
    set_threads(a.threads)
    if a._child:
        child_main(a)
        return
    if a.device == "cpu":  # a runaway candidate (batched_mm asks for >20 GB) fails here and is skipped
        gb = int(2 * a.child_mem_gb * 1024**3)  # instead of the kernel killing this process
        resource.setrlimit(resource.RLIMIT_AS, (gb, gb))
    malloc = keep_freed_memory() if a.train_malloc else "allocator: default (--train-malloc: as make train)"
    print(header(a.device) + "\n" + malloc)
    cfg = model_config(a)
    print(
        f"config: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, {cfg.num_layers} layers, "
        f"{cfg.num_experts} experts top-{cfg.top_k}, heads {cfg.num_heads}/{cfg.num_kv_heads}, vocab "
        f"{cfg.vocab_size}; batch {a.batch} x {a.seq} = {a.batch * a.seq} tokens; {a.dtype} on {a.device}"
        f"{', compiled' if a.compile else ''}; AdamW; median of {a.steps} steps after {a.warmup} warm-up, "
        f"{a.clock} clock\n"
    )
    kinds = [OURS] + [k for k in a.impls.split(",") if k]
    skipped: dict[str, str] = {}
    measure_mem = not a.no_memory and (a.device == "cuda" or rss_supported())
    mem = cpu_memory(a, kinds, skipped) if measure_mem and a.device == "cpu" else {}
    data = batch(cfg, a)
    steps = build_steps(a, cfg, kinds, data, skipped, mem, measure_mem)
    if OURS not in steps:
        sys.exit(f"bench_train: moe_lm itself failed: {skipped.get(OURS)}")
    # Parity on fresh weights: the steps above already moved the benchmarked models apart.
    print("## Step-0 parity (same weights, same batch)\n")
    fresh = {k: build(k, cfg, a) for k in steps}
    print(markdown_table(["model", "LM loss", "|diff|", "HF-form aux loss", "|diff|"], parity(fresh, data)))
    del fresh
    secs = time_alternating(steps, rounds=a.steps, warmup=a.warmup, device=a.device, clock_kind=a.clock)
    report(a, cfg, secs, mem, skipped)


if __name__ == "__main__":
    main()
