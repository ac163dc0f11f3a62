"""The model card's routing section: the figures of `moe-lm routing`, when the run has them.

`moe-lm routing RUN --out RUN/routing ...` leaves them where `moe-lm export` looks (or pass
`moe-lm export --routing DIR`); the export copies the figures into its own `routing/` folder and
the card links them, beside the repetition table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moe_lm.analysis.routing_figures import PASSAGE_HTML, PASSAGE_PNG, SHARES_PNG, SUMMARY_JSON
from moe_lm.errors import UserError

ROUTING_DIR = "routing"  # RUN/routing, and the folder inside an export


def find_routing(checkpoint: Path, override: str | None = None) -> Path | None:
    """`override`, else RUN/routing of the run holding `checkpoint`, when it holds an analysis."""
    if override is not None:
        if not (Path(override) / SUMMARY_JSON).is_file():
            raise UserError(
                f"--routing '{override}' holds no {SUMMARY_JSON}; run `moe-lm routing ... --out {override}`"
            )
        return Path(override)
    for candidate in (checkpoint / ROUTING_DIR, checkpoint.parent.parent / ROUTING_DIR):
        if (candidate / SUMMARY_JSON).is_file():
            return candidate
    return None


def copy_routing(src: Path, export_dir: Path) -> dict[str, Any]:
    """Copy the figures into EXPORT/routing/; returns the analysis summary for the card."""
    try:
        summary = json.loads((src / SUMMARY_JSON).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read '{src / SUMMARY_JSON}' ({e}); run `moe-lm routing` again") from None
    dst = export_dir / ROUTING_DIR
    dst.mkdir(exist_ok=True)
    for name in (SHARES_PNG, PASSAGE_PNG, PASSAGE_HTML):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    summary["copied"] = sorted(p.name for p in dst.iterdir())
    return summary


def routing_section(summary: dict[str, Any]) -> str:
    datasets = ", ".join(
        f"{name} ({tokens:,} tokens)" for name, tokens in summary.get("datasets", {}).items()
    )
    parts = [
        f"Routing of {summary.get('analysed', 'this model')} on {datasets} (`moe-lm routing`).",
    ]
    copied = summary.get("copied", [])
    if SHARES_PNG in copied:
        parts += ["", f"![share of routed tokens per expert and data set]({ROUTING_DIR}/{SHARES_PNG})"]
    if summary.get("repetition_table"):
        parts += ["", "How often consecutive tokens go to the same expert:", "", summary["repetition_table"]]
    if PASSAGE_PNG in copied:
        parts += ["", f"![a passage coloured by first-choice expert]({ROUTING_DIR}/{PASSAGE_PNG})"]
    if PASSAGE_HTML in copied:
        parts += ["", f"The same passage as a page: [{PASSAGE_HTML}]({ROUTING_DIR}/{PASSAGE_HTML})."]
    return "\n".join(parts)
