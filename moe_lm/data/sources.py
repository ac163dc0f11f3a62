"""The run config's data section as resolved source specs: what to read, under which name and key.

`data.train_files` / `val_files` / `val_fraction` is the one-source shorthand: a training source
named "corpus" whose validation set ("corpus") is `val_files`, or else the last `val_fraction` of
its blocks. `data.sources` names a mixture; each source's validation set has the source's name;
`data.val_sources` adds validation-only sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_lm.data.hf_sources import DatasetSpec

if TYPE_CHECKING:
    from moe_lm.config import Config, SourceConfig

SHORTHAND = "corpus"


@dataclass(frozen=True)
class SourceSpec:
    name: str
    key: str  # the setting listing its input, for messages ("data.train_files", "data.sources.web.files")
    files: tuple[str, ...]
    dataset: DatasetSpec | None
    fmt: str
    text_field: str
    weight: float = 1.0
    streaming: bool = False
    chat: bool = False  # records are conversations (data.kind: chat), rendered by the chat template
    messages_field: str = "messages"


@dataclass(frozen=True)
class DataPlan:
    train: tuple[SourceSpec, ...]
    holdout: dict[str, float]  # validation set NAME = the last fraction of training source NAME's blocks
    val: dict[str, SourceSpec]  # validation sets read from their own files / datasets

    @property
    def val_names(self) -> list[str]:
        return [*self.holdout, *self.val]

    def prepared(self) -> list[SourceSpec]:
        """Every spec the store must hold (streaming sources are read while training)."""
        return [s for s in (*self.train, *self.val.values()) if not s.streaming]


def _spec(
    name: str, prefix: str, src: SourceConfig, cfg: Config, files: list[str] | None = None
) -> SourceSpec:
    d = cfg.data
    text_field = src.text_field or d.text_field
    chat = (src.kind or d.kind) == "chat"
    messages_field = src.messages_field or d.messages_field
    if files is not None:  # a source's val_files
        return SourceSpec(
            name,
            f"{prefix}.val_files",
            tuple(files),
            None,
            src.format or d.format,
            text_field,
            chat=chat,
            messages_field=messages_field,
        )
    dataset = None
    if src.dataset:
        dataset = DatasetSpec(src.dataset, src.dataset_config, src.split, text_field, f"{prefix}.dataset")
    return SourceSpec(
        name,
        f"{prefix}.files" if src.files else f"{prefix}.dataset",
        tuple(src.files),
        dataset,
        src.format or d.format,
        text_field,
        src.weight,
        src.streaming,
        chat,
        messages_field,
    )


def data_plan(cfg: Config) -> DataPlan:
    d = cfg.data
    val: dict[str, SourceSpec] = {}
    holdout: dict[str, float] = {}
    train: tuple[SourceSpec, ...]
    if not d.sources:
        chat, field = d.kind == "chat", d.messages_field
        files = tuple(d.train_files)
        train = (
            SourceSpec(
                SHORTHAND, "data.train_files", files, None, d.format, d.text_field, 1.0, False, chat, field
            ),
        )
        if d.val_files:
            files = tuple(d.val_files)
            val[SHORTHAND] = SourceSpec(
                SHORTHAND, "data.val_files", files, None, d.format, d.text_field, 1.0, False, chat, field
            )
        elif d.val_fraction > 0:
            holdout[SHORTHAND] = d.val_fraction
    else:
        specs = []
        for name, src in d.sources.items():
            prefix = f"data.sources.{name}"
            specs.append(_spec(name, prefix, src, cfg))
            if src.val_files:
                val[name] = _spec(name, prefix, src, cfg, files=src.val_files)
                continue
            default = 0.0 if src.streaming else d.val_fraction
            fraction = src.val_fraction if src.val_fraction is not None else default
            if fraction > 0:
                holdout[name] = fraction
        train = tuple(specs)
    for name, src in d.val_sources.items():
        val[name] = _spec(name, f"data.val_sources.{name}", src, cfg)
    return DataPlan(train, holdout, val)


def eval_plan(
    cfg: Config,
    files: list[str],
    kind: str | None = None,
    fmt: str | None = None,
    text_field: str | None = None,
) -> DataPlan:
    """`moe-lm eval --data FILE... [--kind chat|text] [--format F] [--text-field NAME]`: one
    validation set named "data" from these files: conversations when `kind` is chat, or by default
    when the run trained on conversations only (every training source chat); read with the settings
    of the run's first source of that kind unless `fmt` / `text_field` are given."""
    plan = data_plan(cfg)
    if kind is None:
        kind = "chat" if all(s.chat for s in plan.train) else "text"
    like = next((s for s in plan.train if s.chat == (kind == "chat")), None)
    d = cfg.data
    spec = SourceSpec(
        "data",
        "--data",
        tuple(files),
        None,
        fmt or d.format,
        text_field or (like.text_field if like is not None else d.text_field),
        chat=kind == "chat",
        messages_field=like.messages_field if like is not None else d.messages_field,
    )
    return DataPlan((), {}, {"data": spec})


__all__ = ["SHORTHAND", "DataPlan", "SourceSpec", "data_plan", "eval_plan"]
