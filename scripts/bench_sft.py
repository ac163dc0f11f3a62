"""The cost of an instruction-tuning step against a pretraining step at the same tokens per step.

Two real Trainers in one process, on the tiny model: configs/tiny-shakespeare.yaml (blocks of the
corpus, causal attention) and configs/sft-tiny.yaml (conversations from scripts/make_tiny_chat.py,
packed whole with document masking, loss on the assistant's tokens); both 16 x 128 tokens per step,
weights from the seed (no init_from: the cost does not depend on them). Their steps alternate
(scripts/_bench_common.py), so the ratio holds on a busy machine; the absolute times do not.
Also timed alone: the loader's batch (reading and, for conversations, assembling packed rows).

    python scripts/bench_sft.py              # ~1 minute on 2 cores
    python scripts/bench_sft.py --quick      # smoke test, seconds
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _bench_common import REPO, header, markdown_table, set_threads, time_alternating

os.environ.setdefault("WANDB_MODE", "disabled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=12, help="timed steps of each (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=16, help="rows of seq_len tokens per step")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--workdir", type=Path, default=None, help="where runs and the store go (default: a temp dir)"
    )
    p.add_argument("--quick", action="store_true", help="2 rounds of micro-batch 4: checks that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.micro_batch = 2, 1, 4
    return args


def trainer(config: str, work: Path, micro: int, overrides: list[str]) -> Any:
    from moe_lm.config import load_config
    from moe_lm.train.trainer import Trainer

    name = Path(config).stem
    common = [
        f"train.output_dir={work / name}",
        f"train.micro_batch_size={micro}",
        "train.init_from=null",
        "train.overwrite=true",
        f"data.tokenizer={work / 'tokenizer'}",
        f"data.cache_dir={work / 'cache'}",
        "logging.progress_bar=false",
        "logging.jsonl=false",
        "logging.peak_tflops=1",
    ]
    cfg = load_config(REPO / config, [*common, *overrides])
    return Trainer(cfg, callbacks=[])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        chat = work / "chat"
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "make_tiny_chat.py"),
                "--out",
                str(chat),
                "--corpus",
                str(REPO / "data" / "tinyshakespeare.txt"),
            ],
            check=True,
            capture_output=True,
        )
        runs = {
            "pretraining (blocks, causal)": trainer(
                "configs/tiny-shakespeare.yaml",
                work,
                args.micro_batch,
                [f"data.train_files=[{REPO / 'data/tinyshakespeare.txt'}]"],
            ),
            "instruction tuning (packed, document mask)": trainer(
                "configs/sft-tiny.yaml",
                work,
                args.micro_batch,
                [f"data.train_files=[{chat / 'train.jsonl'}]", f"data.val_files=[{chat / 'val.jsonl'}]"],
            ),
        }
        steps = time_alternating({n: t.train_step for n, t in runs.items()}, args.rounds, args.warmup)
        loads = time_alternating({n: t.loader.next_batch for n, t in runs.items()}, args.rounds, args.warmup)
        targets = {}
        for name, t in runs.items():  # labelled tokens of one batch of each
            _, labels = t.loader.next_batch()
            targets[name] = int((labels != -100).sum())
    print(header("cpu"))
    base = next(iter(steps.values()))
    tokens = args.micro_batch * 128
    rows = []
    for name, seconds in steps.items():
        rows.append(
            [
                name,
                tokens,
                targets[name],
                f"{seconds * 1000:.0f}",
                f"{seconds / base:.2f}x",
                f"{loads[name] * 1000:.2f}",
            ]
        )
    print(f"\n## Step cost at the same tokens per step ({args.micro_batch} x 128), median of {args.rounds}\n")
    columns = ["run", "tokens/step", "target tokens/step", "ms/step", "vs pretraining", "loader ms/batch"]
    print(markdown_table(columns, rows))


if __name__ == "__main__":
    main()
