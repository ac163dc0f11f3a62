"""The figures and files of `moe-lm routing` (analysis in routing.py):

expert_shares.png   per shown layer, each expert's share of routed assignments per data set,
                    grouped bars with uniform (1/E) dashed (Mixtral paper, Fig. 7); a heatmap
                    when experts x data sets are too many for bars
expert_shares.csv   every MoE layer, data set and expert: share, first-choice share, count
repetition.md/.csv  consecutive-token repetition rates against uniform random (Table 5)
routing_passage.html/.png  a passage, each token coloured by its first-choice expert per
                    shown layer, with a legend (Fig. 8); the HTML is self-contained
routing.json        what was analysed and the numbers the model card shows
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from moe_lm.analysis.routing import RoutingReport, random_repetition, repetition_table, write_csvs

SHARES_PNG = "expert_shares.png"
PASSAGE_PNG = "routing_passage.png"
PASSAGE_HTML = "routing_passage.html"
SUMMARY_JSON = "routing.json"
WRAP = 96  # characters per line of a passage


def expert_colours(num_experts: int) -> list[str]:
    import matplotlib

    name = "tab10" if num_experts <= 10 else "tab20" if num_experts <= 20 else "hsv"
    cmap = matplotlib.colormaps[name]
    if name == "hsv":
        return [matplotlib.colors.to_hex(cmap(e / num_experts)) for e in range(num_experts)]
    return [matplotlib.colors.to_hex(cmap(e)) for e in range(num_experts)]


def _ink(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#ffffff"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_shares(report: RoutingReport, out: Path) -> Path:
    plt = _pyplot()
    import numpy as np

    names, e = list(report.tallies), report.num_experts
    bars = e * len(names) <= 96
    fig, axes = plt.subplots(
        len(report.layers),
        1,
        figsize=(max(6.0, 0.35 * e * (len(names) if bars else 0.5) + 2), 2.6 * len(report.layers) + 0.8),
        squeeze=False,
        layout="constrained",
    )
    uniform = 1.0 / e
    for ax, layer in zip(axes[:, 0], report.layers):
        share_DE = np.array(
            [
                (lambda t: (t.assignments_E / max(int(t.assignments_E.sum()), 1)).numpy())(
                    report.tally(n, layer)
                )
                for n in names
            ]
        )
        if bars:
            width = 0.8 / len(names)
            for d, name in enumerate(names):
                ax.bar(np.arange(e) + (d - (len(names) - 1) / 2) * width, share_DE[d], width, label=name)
            ax.axhline(uniform, color="gray", linestyle="--", linewidth=1)
            ax.set_xticks(range(e))
            ax.set_ylabel("share of assignments")
        else:
            from matplotlib.colors import TwoSlopeNorm

            norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(float(share_DE.max()), 2 * uniform))
            im = ax.imshow(share_DE, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names)
            fig.colorbar(im, ax=ax, label=f"share (uniform = {uniform:.3g})")
        ax.set_title(f"layer {layer}")
    axes[-1, 0].set_xlabel("expert")
    if bars:
        axes[0, 0].legend(
            fontsize="small", ncols=min(len(names), 4), title=f"data set (uniform = {uniform:.3g})"
        )
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _lines(pieces: list[str], width: int = WRAP) -> list[list[tuple[int, int, str]]]:
    """The passage laid out in fixed-width lines: per line, (token, column, text) segments."""
    lines: list[list[tuple[int, int, str]]] = [[]]
    col = 0
    for token, piece in enumerate(pieces):
        for n, part in enumerate(piece.replace("\t", "    ").split("\n")):
            if n:
                lines.append([])
                col = 0
            while part:
                if col + len(part) > width and col > 0:
                    lines.append([])
                    col = 0
                seg, part = part[: width - col], part[width - col :]
                lines[-1].append((token, col, seg))
                col += len(seg)
    return lines


def plot_passage(report: RoutingReport, out: Path) -> Path:
    """The passage once per shown layer, each token on its first-choice expert's colour."""
    plt = _pyplot()
    from matplotlib.patches import Patch, Rectangle

    assert report.passage is not None
    colours = expert_colours(report.num_experts)
    lines = _lines(report.passage.pieces)
    size = 10  # points; DejaVu Sans Mono advances 0.602 em per character
    char_w, line_h = size * 0.602 / 72, size * 1.6 / 72
    panel_h = line_h * (len(lines) + 1.5)
    fig = plt.figure(figsize=(WRAP * char_w + 0.4, panel_h * len(report.layers) + 0.7))
    for p, layer in enumerate(report.layers):
        first = report.passage.choices[layer][:, 0].tolist()
        top = 1 - (p * panel_h + 0.1) / fig.get_figheight()
        ax = fig.add_axes(
            (
                0.2 / fig.get_figwidth(),
                top - panel_h / fig.get_figheight(),
                WRAP * char_w / fig.get_figwidth(),
                panel_h / fig.get_figheight(),
            )
        )
        ax.set_xlim(0, WRAP)
        ax.set_ylim(len(lines) + 1.5, 0)
        ax.axis("off")
        ax.text(0, 0.6, f"layer {layer}", fontsize=size, fontweight="bold", va="center")
        for row, line in enumerate(lines, start=1):
            for token, col, seg in line:
                colour = colours[first[token]]
                ax.add_patch(Rectangle((col, row + 0.1), len(seg), 0.9, facecolor=colour, edgecolor="none"))
                ax.text(
                    col,
                    row + 0.58,
                    seg,
                    family="DejaVu Sans Mono",
                    fontsize=size,
                    va="center",
                    color=_ink(colour),
                )
    handles = [Patch(facecolor=c, label=f"expert {e}") for e, c in enumerate(colours)]
    fig.legend(
        handles=handles, loc="lower center", ncols=min(len(colours), 8), fontsize="small", frameon=False
    )
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def passage_html(report: RoutingReport, title: str) -> str:
    assert report.passage is not None
    colours = expert_colours(report.num_experts)
    legend = "".join(
        f'<span class="t" style="background:{c};color:{_ink(c)}">expert {e}</span> '
        for e, c in enumerate(colours)
    )
    sections = []
    for layer in report.layers:
        choices = report.passage.choices[layer].tolist()
        spans = []
        for piece, chosen in zip(report.passage.pieces, choices):
            c = colours[chosen[0]]
            tip = "experts " + ", ".join(str(x) for x in chosen) + " (best first)"
            spans.append(
                f'<span class="t" style="background:{c};color:{_ink(c)}" title="{tip}">{html.escape(piece)}</span>'
            )
        sections.append(f'<h2>layer {layer}</h2>\n<div class="p">{"".join(spans)}</div>')
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 60em; }}
.p {{ font-family: monospace; white-space: pre-wrap; line-height: 1.7; }}
.t {{ padding: 1px 0; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each token on the colour of its first-choice expert (hover: all {report.top_k} choices). Passage from
data set <b>{html.escape(report.passage.name)}</b>.</p>
<p>{legend}</p>
{chr(10).join(sections)}
</body></html>
"""


def write_report(report: RoutingReport, out_dir: str | Path, analysed: str) -> list[Path]:
    """Every file of the analysis into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_shares(report, out / SHARES_PNG), *write_csvs(report, out)]
    table = repetition_table(report)
    (out / "repetition.md").write_text(table + "\n")
    written.append(out / "repetition.md")
    title = f"Routing of {analysed}"
    (out / PASSAGE_HTML).write_text(passage_html(report, title))
    written += [out / PASSAGE_HTML, plot_passage(report, out / PASSAGE_PNG)]
    first, either = random_repetition(report.num_experts, report.top_k)
    summary = {
        "analysed": analysed,
        "num_experts": report.num_experts,
        "top_k": report.top_k,
        "layers": report.layers,
        "datasets": {name: tallies[0].tokens for name, tallies in report.tallies.items()},
        "repetition_table": table,
        "random": {"first_choice": first, "either_of_k": either},
        "figures": [SHARES_PNG, PASSAGE_PNG, PASSAGE_HTML],
    }
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    written.append(out / SUMMARY_JSON)
    return written
