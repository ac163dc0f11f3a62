"""Data pipeline at scale: prepare throughput and memory, training memory against corpus size, and
the loader's share of a training step.

A synthetic JSON Lines corpus of encyclopedia-like paragraphs (Zipf-distributed pseudo-words) is
generated once under --workdir, in files of a sixth of the small corpus; the small corpus is the
first six files of the large one.

    python scripts/bench_data.py                   # 60 MB and 300 MB corpora: ~5 minutes on 2 cores
    python scripts/bench_data.py --quick           # 6 and 30 MB, about a minute

What is measured, each in a fresh process (VmHWM = the kernel's resident-set high-water mark):
  prepare   `moe-lm data prepare` of the small corpus with 1 and 2 workers (tokens/s, the speed-up),
            and of the large one with 2 workers; peak RSS of the main process and of a worker
  train     two steps of `moe-lm train` (tiny model, store already prepared) on each corpus: peak RSS
  loader    blocks/s of ResumableLoader.next_batch over the large store, one source and a 3:1
            mixture of two, against the time of one training step of the same batch
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _bench_common import REPO, clock, header, markdown_table, run_child, set_threads

MODEL = {
    "vocab_size": 8192,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_seq_len": 256,
    "rope_theta": 10000.0,
    "num_experts": 8,
    "top_k": 2,
}
SEQ, BATCH = 256, 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small-mb", type=int, default=60)
    p.add_argument("--large-mb", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="6 and 30 MB corpora")
    p.add_argument("--workdir", default=str(REPO / ".cache" / "bench_data"))
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads for the step timing (default: all)"
    )
    p.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (busy machines)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.small_mb, args.large_mb = 6, 30
    return args


# ---------------------------------------------------------------------------------------------
# The corpus


def _vocabulary(rng: np.random.Generator, n: int = 30_000) -> np.ndarray:
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = {"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(n * 2)}
    return np.array(sorted(words)[:n], dtype=object)


def write_corpus(root: Path, total_mb: int, file_mb: int) -> list[Path]:
    """Files of `file_mb` each (the last one smaller) up to `total_mb`; reused when already there."""
    root.mkdir(parents=True, exist_ok=True)
    n_files = max(1, -(-total_mb // file_mb))
    rng = np.random.default_rng(0)
    vocab = _vocabulary(rng)
    zipf = 1.0 / (np.arange(len(vocab)) + 10.0)
    zipf /= zipf.sum()
    files = []
    for i in range(n_files):
        path = root / f"part-{i:04d}.jsonl"
        files.append(path)
        target = min(file_mb, total_mb - i * file_mb) * 1_000_000
        if path.is_file() and path.stat().st_size >= target:
            continue
        frng = np.random.default_rng(1000 + i)  # each file its own stream: small corpus ⊂ large corpus
        tmp = path.with_suffix(".tmp")
        size = 0
        with tmp.open("w") as f:
            while size < target:
                words = vocab[frng.choice(len(vocab), size=20_000, p=zipf)]
                cuts = np.cumsum(frng.integers(40, 200, size=200))
                for a, b in zip(np.concatenate(([0], cuts)), cuts):
                    if b > len(words):
                        break
                    text = " ".join(words[a:b]).capitalize() + "."
                    line = json.dumps({"title": str(words[a]), "text": text}) + "\n"
                    f.write(line)
                    size += len(line)
        tmp.rename(path)
    return files


def run_config(work: Path, name: str, files: list[Path], tokenizer: Path, **data: Any) -> Path:
    cfg = {
        "name": name,
        "model": MODEL,
        "data": {
            "train_files": [str(p) for p in files],
            "tokenizer": str(tokenizer),
            "seq_len": SEQ,
            "cache_dir": str(work / f"cache-{name}"),
            **data,
        },
        "train": {
            "output_dir": str(work / f"run-{name}"),
            "micro_batch_size": BATCH,
            "max_steps": 2,
            "eval_every": 0,
            "eval_batches": 2,
            "sample_tokens": 4,
            "overwrite": True,
        },
        "logging": {"log_every": 1, "progress_bar": False, "peak_tflops": 1.0},
        "checkpoint": {"every": 0, "keep_last": 1},
    }
    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------
# Measured runs, each in a fresh process


def run(mode: str, config: Path) -> dict[str, Any]:
    out = run_child([str(Path(__file__).with_name("_bench_data_child.py")), mode, str(config)], timeout=3600)
    if "error" in out or out.get("code"):
        raise SystemExit(f"{mode} {config.name}: {out.get('error') or out}")
    return out


# ---------------------------------------------------------------------------------------------
# Loader against a training step


def loader_vs_step(config: Path, files: list[Path], clock_kind: str) -> list[list[object]]:
    import torch
    import yaml

    from moe_lm.config import load_config
    from moe_lm.data.corpus import open_data
    from moe_lm.data.loader import ResumableLoader
    from moe_lm.data.tokenizer import Tokenizer
    from moe_lm.model import MoETransformer

    cfg = load_config(config)
    tok = Tokenizer.load(cfg.data.tokenizer)

    raw = yaml.safe_load(config.read_text())
    half = len(files) // 2 or 1
    raw["data"].pop("train_files")
    raw["data"]["sources"] = {
        "a": {"files": [str(p) for p in files[:half]], "weight": 3},
        "b": {"files": [str(p) for p in files[half:] or files], "weight": 1},
    }
    mixture_path = config.with_name("mixture.yaml")
    mixture_path.write_text(yaml.safe_dump(raw))
    mixture = load_config(mixture_path)
    model = MoETransformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    loader = ResumableLoader(open_data(cfg, tok).train, BATCH, seed=1)
    x, y = loader.next_batch()

    def step() -> None:
        out = model(x, labels=y, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    now = clock(clock_kind)
    step()
    t0 = now()
    for _ in range(3):
        step()
    step_s = (now() - t0) / 3
    rows: list[list[object]] = []
    for name, c in (("one source", cfg), ("mixture 3:1 of two", mixture)):
        data = open_data(c, tok)
        batches = ResumableLoader(data.train, BATCH, seed=1)
        batches.next_batch()
        n = 300
        t0 = now()
        for _ in range(n):
            batches.next_batch()
        per_batch = (now() - t0) / n
        blocks = sum(len(s.blocks) for s in data.train)
        rows.append(
            [
                name,
                f"{blocks:,}",
                f"{BATCH / per_batch:,.0f}",
                f"{per_batch * 1e3:.2f}",
                f"{step_s * 1e3:.0f}",
                f"{per_batch / step_s:.2%}",
            ]
        )
    return rows


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    print(header("cpu"))
    work = Path(args.workdir)
    t0 = time.perf_counter()
    file_mb = max(1, args.small_mb // 6)  # the small corpus is 6 files: work that 1 or 2 workers share evenly
    files = write_corpus(work / f"corpus-{file_mb}mb-files", args.large_mb, file_mb)
    small = files[: max(1, args.small_mb // file_mb)]
    mb = {n: sum(p.stat().st_size for p in fs) / 1e6 for n, fs in (("small", small), ("large", files))}
    print(
        f"corpus: {len(files)} JSONL files, {mb['large']:.0f} MB ({time.perf_counter() - t0:.0f} s to make)\n"
    )

    from moe_lm.data.tokenizer import train_tokenizer

    sample = work / "tokenizer-sample.txt"
    with files[0].open() as f:
        sample.write_text("".join(json.loads(line)["text"] + "\n" for _, line in zip(range(3000), f)))
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.model").is_file():
        train_tokenizer([str(sample)], MODEL["vocab_size"], tokenizer)

    for stale in work.glob("cache-*"):
        shutil.rmtree(stale)  # every prepare starts from an empty store
    prep_rows, prep = [], {}
    for name, fs, workers in (("small-1", small, 1), ("small-2", small, 2), ("large", files, 2)):
        cfg = run_config(work, name, fs, tokenizer, num_proc=workers)
        out = prep[name] = run("prepare", cfg)
        corpus = "small" if name.startswith("small") else "large"
        prep_rows.append(
            [
                f"{mb[corpus]:.0f} MB",
                workers,
                f"{out['tokens']:,}",
                f"{out['seconds']:.1f}",
                f"{out['cpu_seconds']:.1f}",
                f"{out['tokens'] / out['seconds']:,.0f}",
                f"{mb[corpus] / out['seconds']:.1f}",
                f"{out['peak_mib']:.0f}",
                f"{out['worker_peak_mib']:.0f}" if workers > 1 else "-",
            ]
        )
    speedup = prep["small-1"]["seconds"] / prep["small-2"]["seconds"]
    cpu_ratio = prep["small-2"]["cpu_seconds"] / prep["small-1"]["cpu_seconds"]
    print(
        "**prepare** (`moe-lm data prepare`, fresh store each; peak RSS of the main process, of a worker):\n"
    )
    print(
        markdown_table(
            ["corpus", "workers", "tokens", "wall s", "CPU s", "tokens/s", "MB/s", "main MiB", "worker MiB"],
            prep_rows,
        )
    )
    print(
        f"\n2 workers / 1 worker: {speedup:.2f}x tokens/s (wall clock), {cpu_ratio:.2f}x the CPU time "
        f"(on an idle machine the speed-up tends to 2 / {cpu_ratio:.2f} = {2 / cpu_ratio:.2f}x)\n"
    )

    train_rows, peaks = [], {}
    for name in ("small-1", "large"):
        # twice each: the high-water mark of a 700 MiB process varies by a few tens of MiB run to run
        runs = [run("train", work / f"{name}.yaml")["peak_mib"] for _ in range(2)]
        corpus = "small" if name.startswith("small") else "large"
        peaks[corpus] = min(runs)
        shown = " / ".join(f"{r:.0f}" for r in runs)
        train_rows.append([f"{mb[corpus]:.0f} MB", f"{prep[name]['tokens']:,}", shown])
    print("**training** (`moe-lm train`, 2 steps + final eval, store prepared; peak RSS of the process):\n")
    print(markdown_table(["corpus", "tokens", "peak RSS MiB (2 runs)"], train_rows))
    growth = peaks["large"] - peaks["small"]
    print(
        f"\ncorpus {mb['small']:.0f} -> {mb['large']:.0f} MB: training peak RSS {growth:+.0f} MiB (lower runs)\n"
    )

    print(f"**loader** (batch {BATCH} x {SEQ + 1} tokens, over the {mb['large']:.0f} MB store):\n")
    rows = loader_vs_step(work / "large.yaml", files, args.clock)
    print(
        markdown_table(["sampling", "blocks", "blocks/s", "ms/batch", "train step ms", "loader share"], rows)
    )
    print(
        f"({args.clock} clock; a step is forward + backward + AdamW of the training runs' model, same batch)"
    )


if __name__ == "__main__":
    sys.exit(main())
