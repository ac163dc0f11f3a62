"""Shuffled, data-parallel-sharded micro-batches over one source or a weighted mixture, resumable
to the exact batch.

Samples are numbered globally: the i-th micro-batch of rank r of D holds global samples
g = (i·B + j)·D + r for j < B, so the i-th batches of all D ranks together are exactly the
samples [i·B·D, (i+1)·B·D), the same set as the i-th batch of one process with micro-batch B·D.
Changing the number of ranks keeps the sample stream; only who reads which block changes.

One prepared source: epochs. Epoch e visits the blocks in the order π_e (a seeded Permutation, see
moe_lm/data/mixture.py); each epoch has N // (B·D) batches, the remainder is dropped.

A mixture (or a streaming source): an endless stream. Sample g goes to source s with ordinal o
(Mixture); for a prepared source that is block π_{s,e}(o mod N_s) with e = o // N_s, so a small
source repeats its epochs (each freshly shuffled) and a large one is subsampled; a streaming source
serves its o-th block in stream order.

The position is global (moe_lm/data/position.py): samples drawn per source, epoch, seed and
stream positions, the same on every rank. Every rank derives its batches from it, so a checkpoint
resumes bit-identically at the same world size and continues the same sample stream at any other
(and with another micro-batch size, whenever the samples drawn divide the new global batch). A
checkpoint over other data is refused unless the run says `train.accept_changed_data`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moe_lm.data.blocks import Blocks, as_blocks, split_inputs
from moe_lm.data.mixture import Mixture, Permutation, derive_key
from moe_lm.data.position import FORMAT, batch_error, changed_data_error, from_rank_states
from moe_lm.data.streaming import StreamBlocks
from moe_lm.errors import UserError


@dataclass
class TrainSource:
    name: str
    weight: float
    blocks: Any  # Blocks (prepared) or StreamBlocks (streaming)
    key: str = ""  # the setting that lists its input, for messages (data.sources.web.files)

    @property
    def streaming(self) -> bool:
        return isinstance(self.blocks, StreamBlocks)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records of the source's data, to refuse resuming over other data."""
        fingerprint = getattr(self.blocks, "fingerprint", None)
        return {
            "streaming": self.streaming,
            "num_blocks": None if self.streaming else len(self.blocks),
            "fingerprint": fingerprint() if fingerprint is not None else None,
        }


class ResumableLoader:
    """`next_batch()` → (input_ids [B, T], labels [B, T]) int64, forever."""

    def __init__(
        self,
        data: Any,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be ≥ 1, got {micro_batch_size}")
        sources = data if isinstance(data, list) else [TrainSource("corpus", 1.0, as_blocks(data))]
        self.sources: list[TrainSource] = sources
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.drop_last = drop_last
        self.single = len(sources) == 1 and not sources[0].streaming
        self.mixture = (
            None if self.single else Mixture([s.weight for s in sources], seed, [s.name for s in sources])
        )
        self._legacy_order = False  # checkpoints from before Permutation used torch.randperm
        self._perms: dict[tuple[int, int], Permutation] = {}
        self._epoch = 0
        self._position = 0  # batches already drawn in this epoch (mixture: since the start)
        # A mixture resumed under other weights: each source's ordinals continue from where that
        # source stood (its samples drawn minus what the new weights would have drawn by now).
        self._offsets = [0] * len(sources)
        self._before_epoch = 0  # one source: samples drawn in the epochs before this one
        self.changed_sources: set[str] = set()  # whose data changed under the checkpoint (accepted)
        self._accept_changed_data = False  # the resume's train.accept_changed_data
        self._notes: list[str] = []  # what restoring the position has to say
        if self.single:
            n = len(sources[0].blocks)
            self.per_rank = n // dp_size
            full, rest = divmod(self.per_rank, micro_batch_size)
            self._batches_per_epoch = full + (1 if rest and not drop_last else 0)
            if self._batches_per_epoch == 0:
                raise UserError(
                    f"the training data has {n} blocks, fewer than one batch of train.micro_batch_size "
                    f"{micro_batch_size} × {dp_size} data-parallel ranks; add data, lower data.seq_len or "
                    "train.micro_batch_size"
                )
        else:
            self.per_rank = 0
            self._batches_per_epoch = 1 << 62

    @property
    def blocks(self) -> Blocks:
        return self.sources[0].blocks  # type: ignore[no-any-return]

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    @property
    def batches_per_epoch(self) -> int:
        return self._batches_per_epoch

    @property
    def global_batch(self) -> int:
        """Samples one micro-batch step of every rank draws together: the unit of the position."""
        return self.micro_batch_size * self.dp_size

    def _perm(self, source: int, epoch: int) -> Permutation:
        key = (source, epoch)
        if key not in self._perms:
            self._perms.clear()  # one epoch at a time per source is all a batch needs
            n = len(self.sources[source].blocks)
            self._perms[key] = Permutation(
                n, derive_key("blocks", self.seed, self.sources[source].name, epoch)
            )
        return self._perms[key]

    def _single_indices(self) -> np.ndarray:
        b, d, r = self.micro_batch_size, self.dp_size, self.dp_rank
        k = np.arange(self._position * b, min((self._position + 1) * b, self.per_rank))
        g = k * d + r  # this rank's samples of the epoch
        if self._legacy_order:
            gen = torch.Generator().manual_seed(self.seed + self._epoch)
            return torch.randperm(len(self.blocks), generator=gen).numpy()[g]
        return self._perm(0, self._epoch)(g)

    def _mixture_batch(self) -> np.ndarray:
        assert self.mixture is not None
        b, d = self.micro_batch_size, self.dp_size
        g = self._position * b * d + np.arange(b) * d + self.dp_rank
        source_of, ordinal = self.mixture.assign(g)
        ordinal = ordinal + np.asarray(self._offsets, dtype=np.int64)[source_of]
        out = np.empty((b, self.sources[0].blocks.block_len), dtype=np.int64)
        for s in np.unique(source_of).tolist():
            rows = np.nonzero(source_of == s)[0]
            src = self.sources[s]
            if src.streaming:
                for row in rows.tolist():
                    out[row] = src.blocks.block(int(ordinal[row]))
                continue
            n = len(src.blocks)
            epochs, offsets = np.divmod(ordinal[rows], n)
            for e in np.unique(epochs).tolist():
                sel = epochs == e
                out[rows[sel]] = src.blocks.read(self._perm(s, e)(offsets[sel]))
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.single:
            if self._position >= self._batches_per_epoch:
                self._before_epoch += self._position * self.global_batch
                self._epoch += 1
                self._position = 0
            x_BL = self.blocks.read(self._single_indices())
        else:
            x_BL = self._mixture_batch()
        self._position += 1
        return split_inputs(x_BL)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def consumed(self) -> dict[str, int]:
        """Samples drawn so far from each source, by all ranks together."""
        if self.single:
            return {self.sources[0].name: self._before_epoch + self._position * self.global_batch}
        assert self.mixture is not None
        counts = self.mixture.consumed(self._position * self.global_batch)
        return {s.name: c + off for s, c, off in zip(self.sources, counts, self._offsets)}

    def state_dict(self) -> dict[str, Any]:
        """The global position (the same on every rank; position.py). Streaming sources are first
        moved up to where the run's samples of them end, so their saved position is global too:
        every block before it was drawn by some rank, and this rank's next one lies after it."""
        consumed = self.consumed()
        sources = []
        for s in self.sources:
            stream = None
            if s.streaming:
                s.blocks.advance_to(consumed[s.name])
                stream = s.blocks.state_dict()
            sources.append(
                {
                    "name": s.name,
                    "weight": s.weight,
                    **s.identity(),
                    "consumed": consumed[s.name],
                    "stream": stream,
                }
            )
        return {
            "format": FORMAT,
            "seed": self.seed,
            "order": "legacy-randperm" if self._legacy_order else "feistel",
            "global_batch": self.global_batch,
            "epoch": self._epoch if self.single else 0,
            "epoch_samples": self._position * self.global_batch if self.single else 0,
            # global samples drawn: a mixture's position (its sources' counts may not add up to it
            # after a source was dropped from the mixture)
            "samples": sum(consumed.values()) if self.single else self._position * self.global_batch,
            "sources": sources,
        }

    def load_state_dict(
        self, state: dict[str, Any] | list[dict[str, Any]], accept_changed_data: bool = False
    ) -> list[str]:
        """Continue where `state` left off: a global position, or the per-rank loader states of an
        older checkpoint. The saved seed wins over the constructor's. -> what the run should say.

        Changed data is refused unless `accept_changed_data`; a global batch that does not divide
        the samples drawn is refused; other mixture weights continue each source where it was."""
        if isinstance(state, list) or "format" not in state:
            state = from_rank_states(state if isinstance(state, list) else [state])
        saved = {s["name"]: s for s in state["sources"]}
        notes = self._check_data(saved, accept_changed_data)
        self._accept_changed_data = accept_changed_data
        self.seed = int(state["seed"])
        if self.mixture is not None:
            self.mixture.reseed(self.seed)
        self._perms.clear()
        self._legacy_order = self.single and state.get("order") == "legacy-randperm"
        saved_batch = int(state["global_batch"])
        if saved_batch != self.global_batch:
            notes.append(
                f"the global batch changed from {saved_batch} to {self.global_batch} samples (train.micro_batch_size "
                f"× processes); the sample stream continues exactly where the checkpoint stopped"
            )
        self._notes = []
        if self.single:
            self._restore_epochs(state, saved)
            notes += self._notes
        else:
            notes += self._restore_mixture(state, saved)
        for s in self.sources:
            old = saved.get(s.name)
            if (
                s.streaming
                and old is not None
                and old.get("stream") is not None
                and s.name not in self.changed_sources
            ):
                s.blocks.load_state_dict(old["stream"])
        return notes

    def _renamed_source(self, saved: dict[str, dict[str, Any]]) -> str | None:
        """The checkpoint's one source when this run's one source is it under another name (its data
        files moved, or named in data.sources now): the same blocks, token for token."""
        if not self.single or len(saved) != 1 or self.sources[0].name in saved:
            return None
        [(name, old)] = saved.items()
        now = self.sources[0].identity()
        same = bool(old.get("fingerprint")) and old["fingerprint"] == now["fingerprint"]
        if same and not old.get("streaming") and old.get("num_blocks") == now["num_blocks"]:
            return name
        return None

    def _check_data(self, saved: dict[str, dict[str, Any]], accept: bool) -> list[str]:
        """Each source the checkpoint also had must hold the same data (size and content)."""
        changes: list[str] = []
        self.changed_sources = set()
        if not any(s.name in saved for s in self.sources):  # nothing in common: every source starts over
            renamed = self._renamed_source(saved)
            if renamed:  # the order of a source's blocks is drawn from its name: same name, same order
                changes.append(
                    f"source '{renamed}' holds the same tokens as this run's '{self.sources[0].name}', but the "
                    f"order of its blocks follows its name: name it '{renamed}' again (data.sources.{renamed}) to "
                    "continue exactly"
                )
            else:
                changes.append(
                    f"the checkpoint's sources are {sorted(saved)}, this run's {[s.name for s in self.sources]}"
                )
            self.changed_sources = {s.name for s in self.sources}
        for s in self.sources:
            old = saved.get(s.name)
            if old is None:
                continue
            now = s.identity()
            what = s.key or f"source '{s.name}'"
            if bool(old.get("streaming")) != now["streaming"]:
                changes.append(f"{what} is {'now' if now['streaming'] else 'no longer'} streaming")
            elif old.get("num_blocks") is None and not now["streaming"]:
                continue  # the oldest checkpoints did not record their data: nothing to compare
            elif old.get("num_blocks") != now["num_blocks"]:
                changes.append(f"{what} had {old.get('num_blocks')} training blocks, now {now['num_blocks']}")
            elif old.get("fingerprint") and now["fingerprint"] and old["fingerprint"] != now["fingerprint"]:
                changes.append(
                    f"{what} holds other tokens ({old['fingerprint'][:12]} -> {now['fingerprint'][:12]})"
                )
            else:
                continue
            self.changed_sources.add(s.name)
        if changes and not accept:
            raise changed_data_error(changes)
        if changes:
            return [
                f"train.accept_changed_data: {'; '.join(changes)}; training continues at the checkpoint's sample "
                "position over the new data, and validation is re-cut from the new data"
            ]
        return []

    def _restore_epochs(self, state: dict[str, Any], saved: dict[str, dict[str, Any]]) -> None:
        name = self.sources[0].name
        if len(saved) == 1 and name in saved and not saved[name].get("streaming"):
            epoch, samples = int(state["epoch"]), int(state["epoch_samples"])
            before = int(state["samples"]) - samples
        else:  # it was a mixture: continue at the source's ordinal, whose epochs are all its blocks
            served = int((saved.get(name) or {}).get("consumed") or 0)
            epoch, samples = divmod(served, len(self.blocks))
            before = served - samples
            inside = samples % self.global_batch
            if inside and not self._accept_changed_data:
                raise UserError(
                    f"the checkpoint was a mixture, and source '{name}' stood {samples} samples into its epoch "
                    f"{epoch}, which is not a whole number of global batches of {self.global_batch}: as one source "
                    "the run cannot continue exactly; resume with the mixture, or set "
                    "train.accept_changed_data=true to continue from the next whole batch"
                )
            if inside:
                skipped = self.global_batch - inside
                self._notes.append(
                    f"train.accept_changed_data: as one source the run skips {skipped} sample(s) of epoch {epoch} "
                    "to start on a whole batch"
                )
                samples += skipped
        if samples % self.global_batch:
            saved_batch = int(state["global_batch"])
            raise batch_error(
                samples, f"into epoch {epoch}", self.micro_batch_size, self.dp_size, saved_batch
            )
        self._epoch, self._position, self._before_epoch = epoch, samples // self.global_batch, before
        if self._position > self._batches_per_epoch:  # only over changed (fewer) data: the epoch is over
            self._epoch, self._position, self._before_epoch = epoch + 1, 0, before + samples

    def _restore_mixture(self, state: dict[str, Any], saved: dict[str, dict[str, Any]]) -> list[str]:
        assert self.mixture is not None
        samples = int(state["samples"])
        if samples % self.global_batch:
            saved_batch = int(state["global_batch"])
            raise batch_error(samples, "into the data", self.micro_batch_size, self.dp_size, saved_batch)
        self._position = samples // self.global_batch
        old = [[s["name"], s["weight"]] for s in state["sources"]]
        if any(s.get("consumed") is None for s in state["sources"]):  # an older checkpoint: recompute
            was = Mixture([w for _, w in old], self.seed, [n for n, _ in old]).consumed(samples)
            for s, count in zip(state["sources"], was):
                s["consumed"] = count
        was_single = len(state["sources"]) == 1 and not state["sources"][0].get("streaming")
        if was_single and state["sources"][0]["name"] in saved:
            # One source counted epochs of whole global batches; a mixture's ordinal counts epochs of
            # all the source's blocks: the same place is epoch·blocks + the samples into the epoch.
            only = saved[state["sources"][0]["name"]]
            blocks = only.get("num_blocks")
            if blocks:
                only["consumed"] = int(state["epoch"]) * int(blocks) + int(state["epoch_samples"])
        now = self.mixture.consumed(samples)
        self._offsets = [
            int((saved.get(s.name) or {}).get("consumed") or 0) - c for s, c in zip(self.sources, now)
        ]
        mixture = [[s.name, s.weight] for s in self.sources]
        if old == mixture:
            return []
        return [
            f"the data mixture changed from {old} to {mixture}: from here on samples follow the new weights, "
            "and each source continues where it stood (a new one from its start)"
        ]


def eval_batches(
    blocks: Any,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation micro-batches in a fixed order: rank r of D reads blocks r, r+D, ... of the first
    per_rank × D blocks. `max_batches` counts the micro-batches of all ranks together, so 1 and D
    processes evaluate the same max_batches × micro_batch_size blocks (and report the same loss;
    the count is rounded down to a multiple of D). Every rank gets the same number of batches, so
    collectives stay matched; the last batch may be smaller. Without max_batches: the whole split
    less its last len % D blocks."""
    blocks = as_blocks(blocks)
    per_rank = len(blocks) // dp_size
    if per_rank == 0:
        raise UserError(
            f"the validation split has {len(blocks)} blocks, fewer than the {dp_size} data-parallel ranks; "
            "add validation data or raise data.val_fraction"
        )
    if max_batches is not None:
        per_rank = min(per_rank, max(max_batches * micro_batch_size // dp_size, 1))
    idx = np.arange(per_rank * dp_size)[dp_rank::dp_size]
    chunks = [idx[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]
    return (split_inputs(blocks.read(c)) for c in chunks)


__all__ = ["ResumableLoader", "TrainSource", "eval_batches"]
