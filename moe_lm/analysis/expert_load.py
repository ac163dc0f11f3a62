"""Expert load of a run or checkpoint as heatmaps (PNG) and a text table (`moe-lm stats`, model cards).

Train records carry `expert_load` (per MoE layer, each expert's fraction of the routed (token,
slot) assignments; a row sums to 1); records.py reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_lm.analysis.records import load_records, moe_layers_of
from moe_lm.errors import UserError

LATEST_PNG = "expert_load.png"
OVER_TIME_PNG = "expert_load_over_time.png"


def layer_labels(num_rows: int, moe_layers: list[int] | None) -> list[str]:
    if moe_layers is not None and len(moe_layers) == num_rows:
        return [f"layer {i}" for i in moe_layers]
    return [f"MoE {i}" for i in range(num_rows)]


def plot_latest(
    load_LE: list[list[float]], out: Path, title: str, moe_layers: list[int] | None = None
) -> Path:
    """Heatmap, MoE layers x experts, of token fractions; the colour scale is centred on 1/E."""
    import matplotlib.pyplot as plt

    fig = latest_figure(load_LE, title, moe_layers)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# Above this many cells the numbers no longer fit; the model card's table beside the image has them.
MAX_ANNOTATED_CELLS = 512


def latest_figure(load_LE: list[list[float]], title: str, moe_layers: list[int] | None = None) -> Any:
    """The figure of `plot_latest`: each cell holds its share in percent, every expert is labelled."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    import numpy as np

    load = np.asarray(load_LE, dtype=float)
    num_layers, num_experts = load.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * num_experts + 2), max(2.5, 0.45 * num_layers + 1.5)))
    # White at balanced (1/E), blue down to an idle expert (0), red up to the busiest one.
    balanced = 1.0 / num_experts
    norm = _load_norm(load, balanced)
    im = ax.imshow(load, aspect="auto", cmap="RdBu_r", norm=norm)
    ax.set_xlabel("expert")
    ax.set_xticks(range(num_experts))
    ax.set_xticklabels(expert_labels(num_experts), fontsize=8 if num_experts <= 32 else 5)
    ax.set_yticks(range(num_layers))
    ax.set_yticklabels(layer_labels(num_layers, moe_layers))
    if load.size <= MAX_ANNOTATED_CELLS:
        for (layer, expert), value in np.ndenumerate(load):
            # dark text on pale cells, white on saturated ones
            strong = abs(norm(value) - 0.5) > 0.3
            ax.text(
                expert,
                layer,
                f"{100 * value:.1f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if strong else "black",
            )
    ax.set_title(f"{title} (% of routed tokens)")
    fig.colorbar(im, ax=ax, label=f"token fraction (balanced = {balanced:.3g})")
    fig.tight_layout()
    return fig


def expert_labels(num_experts: int) -> list[str]:
    return [f"e{e}" for e in range(num_experts)]


def plot_over_time(train: list[dict[str, Any]], out: Path, moe_layers: list[int] | None = None) -> Path:
    """One heatmap per MoE layer: experts x logged records (x ticks show their steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [r.get("step", i) for i, r in enumerate(train)]
    load_SLE = np.asarray([r["expert_load"] for r in train], dtype=float)
    num_records, num_layers, num_experts = load_SLE.shape
    labels = layer_labels(num_layers, moe_layers)
    fig, axes = plt.subplots(
        num_layers,
        1,
        figsize=(8, 1.0 + (0.2 * num_experts + 0.6) * num_layers),
        squeeze=False,
        sharex=True,
        layout="constrained",
    )
    balanced = 1.0 / num_experts
    norm = _load_norm(load_SLE, balanced)
    ticks = sorted(set(np.linspace(0, num_records - 1, min(num_records, 8)).round().astype(int).tolist()))
    for layer, ax in enumerate(axes[:, 0]):
        im = ax.imshow(
            load_SLE[:, layer, :].T,
            aspect="auto",
            cmap="RdBu_r",
            interpolation="nearest",
            norm=norm,
        )
        ax.set_ylabel(f"{labels[layer]}\nexpert")
        ax.set_yticks(range(num_experts))
        ax.set_yticklabels(expert_labels(num_experts), fontsize=7 if num_experts <= 16 else 4)
    axes[-1, 0].set_xticks(ticks)
    axes[-1, 0].set_xticklabels([str(steps[i]) for i in ticks])
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("expert load over training")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label=f"token fraction (balanced = {balanced:.3g})")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def load_table(load_LE: list[list[float]], moe_layers: list[int] | None = None) -> str:
    """Markdown table: one row per MoE layer, each expert's share in percent, and max/mean."""
    num_experts = len(load_LE[0])
    head = "| layer | " + " | ".join(expert_labels(num_experts)) + " | max/mean |"
    rule = "|---" * (num_experts + 2) + "|"
    rows = [head, rule]
    for label, row in zip(layer_labels(len(load_LE), moe_layers), load_LE):
        mean = sum(row) / len(row) if row else 0.0
        ratio = max(row) / mean if mean > 0 else float("nan")
        rows.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}%" for v in row) + f" | {ratio:.2f} |")
    return "\n".join(rows)


def write_stats(path: str | Path, out_dir: str | Path, moe_layers: list[int] | None = None) -> list[Path]:
    """Heatmaps of the latest record and of load over time (when there is a history) into out_dir."""
    records = load_records(path)
    latest = records.latest
    if latest is None or not latest.get("expert_load"):
        raise UserError(f"'{path}' has no train record with expert_load yet; train for a logging step first")
    if moe_layers is None:
        moe_layers = moe_layers_of(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = latest.get("step", "?")
    written = [
        plot_latest(latest["expert_load"], out / LATEST_PNG, f"expert load at step {step}", moe_layers)
    ]
    if len(records.train) > 1:
        written.append(plot_over_time(records.train, out / OVER_TIME_PNG, moe_layers))
    return written


def _load_norm(load: Any, balanced: float) -> Any:
    """Colour scale from 0 (idle expert) through balanced (white) to the busiest expert seen."""
    from matplotlib.colors import TwoSlopeNorm

    return TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=max(float(load.max()), 2 * balanced))
