"""`make gpu-check`: is this GPU machine ready for moe_lm? One script, one table, 8 minutes budgeted.

1. runs tests/gpu (bf16 experts, grouped GEMM);
2. trains configs/gpu-check.yaml (102.8M parameters, 36.7M active) in bf16 for 300 steps, with
   evaluation every 100 steps and a checkpoint at step 150, then exports it (fp32) to a transformers
   folder and compares transformers' logits with ours; beside the run, the plan's prediction for it
   (`moe-lm plan`'s rehearsal of the same layout on this GPU: peak memory, tokens/s, MFU);
3. resumes a second run from the step-150 checkpoint and compares its losses and final weights
   with the uninterrupted run;
4. runs scripts/bench_train.py --device cuda --dtype bf16, without and with --compile (against
   transformers' grouped_mm experts);
then prints one table (tokens/s, MFU, peak memory, resume exactness, export parity), writes it to
OUT/gpu_check.md and exits 1 if any check failed.

The two training runs use deterministic algorithms (torch.use_deterministic_algorithms, warn-only),
so that resumed and uninterrupted runs can be compared bit for bit; bench_train measures speed.

    python scripts/gpu_check.py                        # --device cuda
    python scripts/gpu_check.py --device cpu --smoke   # a tiny model in seconds: the same logic (tested)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from _bench_common import REPO, header  # noqa: E402

MIB = 1024 * 1024
# A model and a run small enough for a CPU test; everything else as configs/gpu-check.yaml.
SMOKE = [
    "model.vocab_size=384",
    "model.hidden_size=48",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.max_seq_len=64",
    "model.num_experts=4",
    "data.seq_len=32",
    "train.micro_batch_size=4",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.eval_batches=2",
    "train.sample_tokens=8",
    "train.mixed_precision='no'",
    "logging.log_every=1",
    "checkpoint.every=3",
]


@dataclass
class Row:
    check: str
    result: str
    ok: bool
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_mib: float | None = None

    def cells(self) -> list[str]:
        return [
            self.check,
            "-" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f}",
            "-" if self.mfu is None else f"{100 * self.mfu:.1f}%",
            "-" if self.peak_mib is None else f"{self.peak_mib:,.0f}",
            self.result.replace("|", "/"),  # a cell of a markdown table
            "ok" if self.ok else "FAILED",
        ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny model and runs: checks the logic, not the GPU")
    p.add_argument("--out", default="runs/gpu-check", help="working directory (replaced)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (subprocesses stop)")
    return p.parse_args(argv)


def remaining(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def run(cmd: list[str], deadline: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=remaining(deadline)
        )
    except subprocess.TimeoutExpired:
        return -1, "timed out (the time budget ran out)"
    return proc.returncode, proc.stdout + proc.stderr


# ---- 1. tests/gpu ---------------------------------------------------------------------------------


def gpu_tests(a: argparse.Namespace, deadline: float) -> Row:
    rc, text = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"], deadline)
    counts = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", text))
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or text.strip()[-200:]
    # Without a GPU every test skips; on one, a skip means CUDA was not usable.
    ok = rc == 0 and (a.device == "cpu" or not counts.get("skipped"))
    return Row("tests/gpu", summary, ok)


# ---- 2./3. train, resume, export ------------------------------------------------------------------


def run_config(a: argparse.Namespace, out: Path, name: str, *extra: str) -> Any:
    from moe_lm.config import load_config

    overrides = [f"train.output_dir={out / name}", "train.overwrite=true", "logging.progress_bar=false"]
    if a.smoke:
        corpus = out / "corpus.txt"
        if not corpus.is_file():
            corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:60_000])
        overrides += SMOKE + [f"data.tokenizer={out / 'tokenizer'}", f"data.cache_dir={out / 'cache'}"]
        overrides.append(f"data.train_files=[{corpus}]")
    else:
        overrides += [
            f"data.train_files=[{REPO / 'data' / 'tinyshakespeare.txt'}]",
            f"data.tokenizer={REPO / 'tokenizers' / 'gpu-check'}",
            f"data.cache_dir={REPO / '.cache' / 'moe_lm'}",
        ]
    return load_config(REPO / "configs" / "gpu-check.yaml", [*overrides, *extra])


def train(cfg: Any, device: str) -> tuple[list[dict[str, Any]], float | None]:
    """Train in this process; -> (metrics.jsonl records, peak GPU memory in MiB or None)."""
    from moe_lm.train.trainer import Trainer

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    finally:
        trainer.backend.shutdown()
    peak = torch.cuda.max_memory_allocated() / MIB if device == "cuda" else None
    lines = (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], peak


def max_weight_diff(a: Path, b: Path) -> float:
    from moe_lm.state.weights import load_model_state

    wa, wb = load_model_state(a), load_model_state(b)
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def plan_row(cfg: Any, device: str) -> Row:
    """What `moe-lm plan` predicts for the training run below (its layout, 1 process): peak memory,
    and on a GPU tokens/s and MFU, beside what the run measures."""
    from moe_lm.plan.gpus import cpu_target
    from moe_lm.plan.layouts import of_config
    from moe_lm.plan.planner import Job, evaluate_layout
    from moe_lm.plan.preflight import local_gpu

    gpu = local_gpu() if device == "cuda" else cpu_target(24 * 1024**3)
    c = evaluate_layout(Job(cfg, 1, 1, gpu), of_config(cfg))
    on_gpu = device == "cuda"  # the roofline is a GPU's; on a CPU only the memory is predicted
    return Row(
        f"plan of that run ({c.layout.name}, {gpu.name})",
        f"predicted; peak during the {c.rehearsal.peak_phase}",
        True,
        c.time.tokens_per_s if on_gpu else None,
        c.time.mfu if on_gpu else None,
        c.rehearsal.peak / MIB,
    )


def train_resume_export(a: argparse.Namespace, out: Path) -> list[Row]:
    torch.use_deterministic_algorithms(True, warn_only=True)
    straight = run_config(a, out, "straight")
    steps, half = straight.train.max_steps, straight.checkpoint.every
    precision = {"no": "fp32"}.get(straight.train.mixed_precision, straight.train.mixed_precision)
    prediction = plan_row(straight, a.device)  # before training: a rehearsal needs a process of its own
    records, peak = train(straight, a.device)
    logged = [r for r in records if r["kind"] == "train" and r["step"] > 1]  # step 1 allocates
    evals = [r["val_loss"] for r in records if r["kind"] == "eval"]
    rows = [
        Row(
            f"train {steps} steps, {precision}, {params(straight)}",
            f"val loss {evals[0]:.3f} -> {evals[-1]:.3f}",
            evals[-1] < evals[0],
            statistics.median(r["tokens_per_s"] for r in logged),
            statistics.median(r["mfu"] for r in logged),
            peak,
        ),
        prediction,
    ]
    ckpts = straight.output_dir / "checkpoints"
    resumed = run_config(a, out, "resumed", f"train.resume={ckpts / f'step-{half}'}")
    again, _ = train(resumed, a.device)
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train" and r["step"] > half}
    diffs = [
        abs(r["loss"] - losses[r["step"]]) for r in again if r["kind"] == "train" and r["step"] in losses
    ]
    dloss = max(diffs)
    dweight = max_weight_diff(ckpts / f"step-{steps}", resumed.output_dir / "checkpoints" / f"step-{steps}")
    exact = dloss == 0.0 and dweight == 0.0
    rows.append(
        Row(
            f"resume at {half} vs straight {steps}",
            "bit-exact"
            if exact
            else f"max abs diff: loss {dloss:.1e}, weights {dweight:.1e} ({len(diffs)} steps)",
            exact or (a.device == "cuda" and dloss <= 1e-3),
        )
    )
    rows.append(export_parity(ckpts / f"step-{steps}", out / "export", a.device))
    return rows


def params(cfg: Any) -> str:
    from moe_lm.model.params import count_params

    return f"{count_params(cfg.model).total_params / 1e6:.1f}M params"


@torch.no_grad()
def export_parity(ckpt: Path, export_dir: Path, device: str) -> Row:
    """Export fp32; transformers' logits on validation text against ours from the checkpoint."""
    from transformers import AutoModelForCausalLM

    from moe_lm.cli import main as cli
    from moe_lm.data.tokenizer import Tokenizer
    from moe_lm.state.weights import load_pretrained

    if cli(["export", str(ckpt), "--out", str(export_dir), "--dtype", "fp32", "--overwrite"]) != 0:
        return Row("export fp32 -> transformers", "moe-lm export failed", False)
    cfg, ours = load_pretrained(ckpt, device)
    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).to(device).eval()
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[-4000:]
    ids = Tokenizer.load(cfg.data.tokenizer).encode(text)[: cfg.data.seq_len]
    ids_BT = torch.tensor([ids], device=device)
    diff = float((ours.eval()(ids_BT).logits - hf(ids_BT, use_cache=False).logits).abs().max())
    return Row("export fp32 -> transformers", f"max abs logit diff {diff:.1e}", diff < 1e-3)


# ---- 4. bench_train -------------------------------------------------------------------------------


def parse_bench(text: str) -> dict[str, Any]:
    """The moe_lm row of bench_train's "Train step" table, by column name, and its speed-up line."""
    lines = text[text.index("## Train step") :].splitlines()
    table = [line for line in lines if line.startswith("|")]
    cols = [c.strip() for c in table[0].strip("|").split("|")]
    row = next(line for line in table[2:] if line.strip("| ").startswith("moe_lm "))
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    mem = next((v for k, v in cells.items() if "MiB" in k), "-")
    vs = re.search(r"moe_lm / best transformers \((\S+)\): ([\d.]+)x tokens/s", text)
    return {
        "tokens_per_s": float(cells["tokens/s"].replace(",", "")),
        "flops": float(cells["GFLOP/s"].replace(",", "")) * 1e9,
        "peak_mib": None if mem in ("-", "") else float(mem.replace(",", "")),
        "vs": f"{vs.group(2)}x transformers {vs.group(1)}" if vs else "no transformers row",
    }


def bench(a: argparse.Namespace, compile_: bool, deadline: float, peak_flops: float) -> Row:
    dtype = "fp32" if a.smoke else "bf16"
    name = f"bench_train {dtype}" + (" --compile" if compile_ else "")
    if compile_ and a.smoke:
        return Row(name, "skipped with --smoke (inductor takes minutes on a CPU)", True)
    cmd = [sys.executable, "scripts/bench_train.py", "--device", a.device, "--dtype", dtype]
    cmd += ["--impls", "eager" if a.smoke else "grouped_mm"] + (["--compile"] if compile_ else [])
    cmd += ["--quick", "--no-memory"] if a.smoke else []
    rc, text = run(cmd, deadline)
    if rc != 0 or "## Train step" not in text:
        return Row(name, "failed: " + " ".join(text.strip().splitlines()[-2:])[-160:], False)
    got = parse_bench(text)
    return Row(name, got["vs"], True, got["tokens_per_s"], got["flops"] / peak_flops, got["peak_mib"])


def table(rows: list[Row]) -> str:
    """Markdown; numbers right-aligned, words left-aligned."""
    cols = ["check", "tokens/s", "MFU", "peak MiB", "result", "status"]
    cells = [r.cells() for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    right = {1, 2, 3}

    def line(values: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))
            )
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 1) + (":" if i in right else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cols), rule, *(line(c) for c in cells)])


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    deadline = time.monotonic() + a.budget
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from moe_lm.config import Config
    from moe_lm.train.metrics import peak_flops

    peak = peak_flops(Config(), torch.device(a.device))  # per GPU; on a CPU an estimate
    rows = [gpu_tests(a, deadline)]
    try:
        rows += train_resume_export(a, out)
    except Exception as e:  # the bench below still runs; the table says what broke
        rows.append(Row("train / resume / export", f"failed: {type(e).__name__}: {e}"[:200], False))
    torch.use_deterministic_algorithms(False)
    rows += [bench(a, False, deadline, peak), bench(a, True, deadline, peak)]
    report = f"{header(a.device)}\n\n{table(rows)}\n"
    print("\n## gpu-check\n\n" + report)
    (out / "gpu_check.md").write_text(report)
    failed = [r.check for r in rows if not r.ok]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
