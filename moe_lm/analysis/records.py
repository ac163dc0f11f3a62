"""What a run or checkpoint recorded about training: its metric records and trainer state.

Train records in `RUN/metrics.jsonl` carry `expert_load` (per MoE layer, each expert's fraction of
the routed (token, slot) assignments; a row sums to 1) and `imbalance` (max/mean per layer). A
checkpoint holds its latest train record in `trainer_state.json`; when the checkpoint sits in a
run directory, the run's history up to the checkpoint step is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_lm.config import load_config
from moe_lm.errors import UserError
from moe_lm.state.resolve import resolve_checkpoint


@dataclass
class RunRecords:
    """What a run or checkpoint tells about training; any part may be missing."""

    train: list[dict[str, Any]] = field(default_factory=list)  # train records with expert_load, by step
    evals: list[dict[str, Any]] = field(default_factory=list)
    trainer_state: dict[str, Any] | None = None
    checkpoint: Path | None = None

    @property
    def latest(self) -> dict[str, Any] | None:
        """The newest train record: the run's, or else the checkpoint's `last_metrics`."""
        if self.train:
            return self.train[-1]
        last = (self.trainer_state or {}).get("last_metrics")
        return last if isinstance(last, dict) and last else None

    @property
    def latest_eval(self) -> dict[str, Any] | None:
        return self.evals[-1] if self.evals else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # The last line of a run that was killed mid-write may be cut; earlier ones may not.
            if number == len(lines):
                continue
            raise UserError(f"{path}:{number} is not valid JSON; the metrics file is damaged") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_state(ckpt: Path) -> dict[str, Any] | None:
    path = ckpt / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"'{path}' is not valid JSON; the checkpoint is damaged") from None
    return state if isinstance(state, dict) else None


def load_records(path: str | Path) -> RunRecords:
    """Records of a run directory (its metrics.jsonl) or of a checkpoint (plus its run's history)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"'{path}' does not exist; pass a run directory or a checkpoint directory")
    metrics: Path | None = p / "metrics.jsonl" if (p / "metrics.jsonl").is_file() else None
    out = RunRecords()
    limit: int | None = None
    try:
        out.checkpoint = resolve_checkpoint(p)
    except UserError:
        if metrics is None:
            raise UserError(f"'{path}' holds neither metrics.jsonl nor a moe_lm checkpoint") from None
    if out.checkpoint is not None:
        out.trainer_state = _read_state(out.checkpoint)
        if metrics is None:  # RUN/checkpoints/step-N -> RUN/metrics.jsonl
            candidate = out.checkpoint.parent.parent / "metrics.jsonl"
            metrics = candidate if candidate.is_file() else None
            limit = (out.trainer_state or {}).get("step")
    if metrics is not None:
        records = _read_jsonl(metrics)
        if isinstance(limit, int):  # the run may have gone on after this checkpoint
            records = [r for r in records if int(r.get("step", 0)) <= limit]
        out.train = [r for r in records if r.get("kind", "train") == "train" and r.get("expert_load")]
        out.evals = [r for r in records if r.get("kind") == "eval" and r.get("val_loss") is not None]
    return out


def moe_layers_of(records: RunRecords) -> list[int] | None:
    """Model layer index of each MoE row, from the checkpoint's config (None when unknown)."""
    if records.checkpoint is None:
        return None
    try:
        return load_config(records.checkpoint / "config.yaml").model.moe_layer_indices
    except UserError:
        return None
