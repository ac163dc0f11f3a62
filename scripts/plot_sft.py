"""The loss curves of an instruction-tuning run as one PNG: validation loss over the assistant's
tokens of the held-out conversations at every evaluation, and the training LM loss (same tokens,
the step's batch) at every logged step.

    python scripts/plot_sft.py runs/sft-tiny --out docs/img/sft-tiny-loss.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run directory (its metrics.jsonl)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = p.parse_args(argv)
    records = [
        json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines() if line.strip()
    ]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not evals:
        raise SystemExit(f"error: {args.run / 'metrics.jsonl'} has no evaluation; train with eval_every > 0")
    over = evals[-1].get("loss_on", "all")
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(
        [r["step"] for r in train], [r["lm_loss"] for r in train], color="#bbbbbb", label="training batch"
    )
    ax.plot(
        [r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="#1f5fa8", label="validation"
    )
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss over {over} tokens")
    ax.set_title(f"{args.run.name}: loss on the {over} tokens of held-out conversations")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    first, last = evals[0], evals[-1]
    print(
        f"wrote {args.out}: validation loss {first['val_loss']:.3f} at step {first['step']} -> "
        f"{last['val_loss']:.3f} at step {last['step']} (over {over} tokens)"
    )


if __name__ == "__main__":
    main()
