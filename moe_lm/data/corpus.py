"""The data of a run: prepare the store (main process only), then open every source as blocks.

With several processes, every one calls `open_data` with `waits` (moe_lm/parallel/waits.py) and
only the main one (`is_main`; per node if nodes do not share `data.cache_dir`) tokenises; the others
open the shards after a barrier. Preparing may take hours, so that barrier times out only when the
preparer makes no progress for `parallel.timeout`; if preparing fails, the main process raises the
error (the CLI announces it to the others, who stop at once instead of hanging).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from moe_lm.data.blocks import Blocks, StoreBlocks, TokenStream
from moe_lm.data.loader import TrainSource
from moe_lm.data.packing import PackedBlocks, packed_blocks
from moe_lm.data.prepare import PreparedSource, chat_template_for, plan_shards, prepare_sources, store_dir
from moe_lm.data.sources import DataPlan, SourceSpec, data_plan
from moe_lm.data.store import input_identity, shard_status
from moe_lm.errors import UserError

if TYPE_CHECKING:
    from moe_lm.config import Config
    from moe_lm.data.tokenizer import Tokenizer


class StoreWaits(Protocol):
    """How processes wait for the ones preparing the store (moe_lm/parallel/waits.py's `Waits`)."""

    def progress(self) -> None: ...

    def barrier(self, what: str, *, idle: bool = False) -> None: ...


@dataclass
class RunData:
    train: list[TrainSource] = field(default_factory=list)
    val: dict[str, Blocks] = field(default_factory=dict)  # validation set name -> blocks
    packing: list[str] = field(
        default_factory=list
    )  # one line per chat source: what was packed, cut, dropped

    @property
    def packed(self) -> bool:
        """Some training rows are packed conversations: labels have -100s, rows have document ids."""
        return any(isinstance(s.blocks, PackedBlocks) for s in self.train)

    @property
    def chat(self) -> bool:
        """Some training or validation set is conversations."""
        return self.packed or any(isinstance(b, PackedBlocks) for b in self.val.values())


def _opened(cfg: Config, tokenizer: Tokenizer, specs: list[SourceSpec]) -> list[PreparedSource]:
    """The prepared shards of `specs` (a process that did not prepare them)."""
    shard_dir = store_dir(cfg) / "shards"
    out = []
    template = chat_template_for(tokenizer, specs)
    for spec in specs:
        shards, empty = plan_shards(spec, template)
        src = PreparedSource(spec, [n for n, _ in shards], empty_files=empty)
        for name, piece in shards:
            status, manifest = shard_status(shard_dir, name, input_identity(piece), tokenizer.fingerprint)
            if status != "ok" or manifest is None:
                raise UserError(  # the preparing process finished without error, so it is not there
                    f"the token store for {spec.key} was not built ({name}: {status}) in {store_dir(cfg)}; "
                    "prepare it with `moe-lm data prepare CONFIG`, or give every node the same data.cache_dir"
                )
            src.manifests.append(manifest)
        out.append(src)
    return out


def _blocks(cfg: Config, src: PreparedSource, pad_id: int) -> StoreBlocks | PackedBlocks:
    block_len = cfg.data.seq_len + 1
    worst = max(m["max_id"] for m in src.manifests)
    if worst >= cfg.model.vocab_size:
        raise UserError(
            f"{src.spec.key}: the store holds token id {worst} ≥ model.vocab_size = {cfg.model.vocab_size}; "
            "raise model.vocab_size to the tokenizer's size or re-prepare with data.tokenizer"
        )
    if src.spec.chat:
        train_on = cfg.data.train_on or "assistant"
        shard_dir = store_dir(cfg) / "shards"
        args = (block_len, pad_id, train_on, cfg.data.too_long, src.spec.key)
        return packed_blocks(shard_dir, src.names, src.manifests, *args)
    blocks = StoreBlocks(TokenStream(store_dir(cfg) / "shards", src.names, src.manifests), block_len)
    if len(blocks) == 0:
        raise UserError(
            f"{src.spec.key} yields {src.tokens} tokens, fewer than one block of seq_len+1 = {block_len}; "
            "add data or lower data.seq_len"
        )
    return blocks


def open_data(
    cfg: Config,
    tokenizer: Tokenizer,
    *,
    plan: DataPlan | None = None,
    train: bool = True,
    is_main: bool = True,
    waits: StoreWaits | None = None,
) -> RunData:
    """Training sources (when `train`) and every validation set of `plan` (default: the config's)."""
    from moe_lm.data.streaming import StreamBlocks

    plan = plan or data_plan(cfg)
    wanted = [s for s in plan.train if train or s.name in plan.holdout]
    specs = [s for s in (*wanted, *plan.val.values()) if not s.streaming]
    heartbeat: Callable[[], None] | None = waits.progress if waits is not None else None
    prepared = prepare_sources(cfg, tokenizer, specs, heartbeat=heartbeat) if is_main else None
    if waits is not None:
        waits.barrier("preparing the token store", idle=True)
    if prepared is None:
        prepared = _opened(cfg, tokenizer, specs)
    by_key = {p.spec.key: p for p in prepared}
    data = RunData()
    for spec in wanted:
        if spec.streaming:
            assert spec.dataset is not None
            data.train.append(
                TrainSource(
                    spec.name,
                    spec.weight,
                    StreamBlocks(spec.dataset, tokenizer, cfg.data.seq_len + 1),
                    spec.key,
                )
            )
            continue
        blocks = _blocks(cfg, by_key[spec.key], tokenizer.eos_id)
        if spec.name in plan.holdout:
            blocks, data.val[spec.name] = blocks.split(plan.holdout[spec.name], spec.key)
        data.train.append(TrainSource(spec.name, spec.weight, blocks, spec.key))
    for name, spec in plan.val.items():
        data.val[name] = _blocks(cfg, by_key[spec.key], tokenizer.eos_id)
    if not train:
        data.train = []
    data.val = {name: data.val[name] for name in plan.val_names if name in data.val}  # config order
    for role, sets in (("training", {s.name: s.blocks for s in data.train}), ("validation", data.val)):
        data.packing += [f"{b.report.line()} ({role})" for b in sets.values() if isinstance(b, PackedBlocks)]
    if is_main:
        for line in data.packing:
            print(line, flush=True)
    return data


__all__ = ["RunData", "open_data"]
