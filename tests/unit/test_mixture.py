"""Seeded permutations and weighted mixtures: exact proportions, independence of the world size,
small sources repeating their epochs, large ones subsampled, resume bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_lm.data.blocks import ArrayBlocks
from moe_lm.data.loader import ResumableLoader, TrainSource
from moe_lm.data.mixture import Mixture, Permutation
from moe_lm.errors import ConfigError, UserError


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 65, 1000, 4097])
def test_permutation_is_a_bijection_and_depends_on_its_key(n: int) -> None:
    values = Permutation(n, 11)(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    assert np.array_equal(values, Permutation(n, 11)(np.arange(n)))  # deterministic
    if n >= 5:
        assert not np.array_equal(values, Permutation(n, 12)(np.arange(n)))
    # random access equals the full order
    idx = np.array([n - 1, 0, n // 2])
    assert np.array_equal(Permutation(n, 11)(idx), values[idx])


def test_permutation_looks_shuffled() -> None:
    n = 10_000
    values = Permutation(n, 3)(np.arange(n))
    # neighbours land far apart and the order is not correlated with the input order
    assert abs(np.corrcoef(np.arange(n), values)[0, 1]) < 0.05
    assert np.median(np.abs(np.diff(values))) > n / 10
    # a pinned value: the order must never change between versions (checkpoints resume on it)
    assert Permutation(10, 1)(np.arange(10)).tolist() == [4, 3, 9, 0, 2, 7, 1, 8, 5, 6]


def test_mixture_holds_every_prefix_to_its_weights() -> None:
    weights = [0.5, 0.3, 0.15, 0.05]
    mix = Mixture(weights, seed=0, names=list("abcd"))
    n = 5 * mix.round_size + 123
    sources, ordinals = mix.assign(np.arange(n))
    for k in range(1, 6):  # at every round boundary, within one sample of the exact share
        counts = np.bincount(sources[: k * mix.round_size], minlength=4)
        assert np.all(np.abs(counts - np.array(weights) * k * mix.round_size) < 1), counts
    assert mix.consumed(n) == np.bincount(sources, minlength=4).tolist()
    for s in range(4):  # each source's ordinals are 0, 1, 2, ... in sample order
        assert ordinals[sources == s].tolist() == list(range(int((sources == s).sum())))
    # sample by sample computation agrees with the batch (no hidden sequential state)
    fresh = Mixture(weights, seed=0, names=list("abcd"))
    for g in (n - 1, 7, mix.round_size * 3 + 5):
        s, o = fresh.assign(np.array([g]))
        assert (s[0], o[0]) == (sources[g], ordinals[g])
    other = Mixture(weights, seed=1, names=list("abcd")).assign(np.arange(200))[0]
    assert not np.array_equal(other, sources[:200])


def test_mixture_rounds_grow_for_small_weights_and_refuse_absurd_ones() -> None:
    mix = Mixture([1.0, 0.0001], seed=0, names=["big", "tiny"])
    assert mix.round_size >= 10_001
    assert mix.consumed(mix.round_size)[1] >= 1  # the tiny source appears in every round
    with pytest.raises(ConfigError, match="weights span more than"):
        Mixture([1.0, 1e-9], seed=0, names=["a", "b"])


def _source(name: str, n: int, weight: float, base: int) -> TrainSource:
    # block i holds (base + i) everywhere, so a batch's first column identifies source and block
    blocks = (base + torch.arange(n)).repeat_interleave(5).view(n, 5).to(torch.int32)
    return TrainSource(name, weight, ArrayBlocks(blocks))


def _mixture() -> list[TrainSource]:
    return [_source("small", 7, 1.0, 1000), _source("large", 500, 3.0, 0)]


def _ids(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_mixture_loader_draws_to_weights_repeats_small_and_subsamples_large() -> None:
    loader = ResumableLoader(_mixture(), micro_batch_size=8, seed=5)
    assert loader.mixture is not None and loader.mixture.round_size == 1024
    seen = [i for _ in range(128) for i in _ids(loader.next_batch()[0])]  # one round of 1024 samples
    small = [i - 1000 for i in seen if i >= 1000]
    large = [i for i in seen if i < 1000]
    assert (len(small), len(large)) == (256, 768)  # exactly 1 : 3 over a round
    # the small source (7 blocks) repeats whole epochs, each a fresh permutation of all 7
    epochs = [small[i : i + 7] for i in range(0, len(small) - 6, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs) and len({tuple(e) for e in epochs}) > 1
    # the large one (500 blocks) is read without repeats within each of its epochs
    assert sorted(large[:500]) == list(range(500)) and len(set(large[500:])) == len(large) - 500
    counts = loader.consumed()
    assert counts == {"small": len(small), "large": len(large)}


def test_mixture_loader_is_independent_of_world_size_and_resumes_exactly() -> None:
    single = ResumableLoader(_mixture(), micro_batch_size=6, seed=2)
    ranks = [ResumableLoader(_mixture(), micro_batch_size=3, dp_rank=r, dp_size=2, seed=2) for r in range(2)]
    for _ in range(20):
        one = _ids(single.next_batch()[0])
        parts = [_ids(r.next_batch()[0]) for r in ranks]
        assert sorted(one) == sorted(parts[0] + parts[1])
    assert single.consumed() == ranks[0].consumed() == ranks[1].consumed()

    state = ranks[1].state_dict()
    expected = [ranks[1].next_batch() for _ in range(30)]
    restored = ResumableLoader(_mixture(), micro_batch_size=3, dp_rank=1, dp_size=2, seed=999)
    restored.load_state_dict(state)
    for (x, y), (ex, ey) in zip((restored.next_batch() for _ in range(30)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_mixture_resume_guards() -> None:
    """Changed data is refused even when a weight changes too (the size check sat behind the
    weights check); other weights alone continue every source exactly where it stood."""
    loader = ResumableLoader(_mixture(), micro_batch_size=4)
    seen = [i for _ in range(50) for i in _ids(loader.next_batch()[0])]
    state = loader.state_dict()
    changed = [_source("small", 8, 1.0, 1000), _source("large", 500, 3.0, 0)]
    with pytest.raises(UserError, match=r"source 'small' had 7 training blocks, now 8"):
        ResumableLoader(changed, micro_batch_size=4).load_state_dict(state)
    changed_and_reweighted = [_source("small", 8, 2.0, 1000), _source("large", 500, 3.0, 0)]
    with pytest.raises(UserError, match=r"the training data changed since the checkpoint"):
        ResumableLoader(changed_and_reweighted, micro_batch_size=4).load_state_dict(state)
    reweighted = ResumableLoader([_source("small", 7, 2.0, 1000), _source("large", 500, 3.0, 0)], 4)
    notes = reweighted.load_state_dict(state)
    assert notes == [
        "the data mixture changed from [['small', 1.0], ['large', 3.0]] to [['small', 2.0], ['large', 3.0]]: "
        "from here on samples follow the new weights, and each source continues where it stood (a new one from "
        "its start)"
    ]
    assert reweighted.consumed() == loader.consumed()
    more = [i for _ in range(50) for i in _ids(reweighted.next_batch()[0])]
    # the large source (no repeats within its 500-block epoch) goes on without repeating a block
    large = [i for i in seen + more if i < 1000]
    assert len(large) < 500 and len(set(large)) == len(large)
    counts = reweighted.consumed()
    assert counts["small"] - loader.consumed()["small"] > 50  # now 2 : 3


def test_single_source_legacy_checkpoints_keep_their_randperm_order() -> None:
    blocks = torch.arange(23 * 5, dtype=torch.int32).view(23, 5)
    old_state = {"epoch": 1, "position": 2, "seed": 7, "num_blocks": 23, "micro_batch_size": 3, "dp_size": 1}
    loader = ResumableLoader(blocks, micro_batch_size=3)
    loader.load_state_dict([old_state])  # one rank's state, written before "order" and the global position
    x, _ = loader.next_batch()
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(7 + 1))
    assert (x[:, 0] // 5).tolist() == perm[6:9].tolist()


def test_dropping_a_source_keeps_the_position_and_the_others_where_they_were() -> None:
    three = ResumableLoader([*_mixture(), _source("extra", 50, 1.0, 2000)], micro_batch_size=4)
    for _ in range(30):
        three.next_batch()
    state = three.state_dict()
    two = ResumableLoader(_mixture(), micro_batch_size=4)
    assert "the data mixture changed" in two.load_state_dict(state)[0]
    assert two.position == 30 and two.state_dict()["samples"] == 120  # the global position, not a sum
    assert two.consumed() == {k: v for k, v in three.consumed().items() if k != "extra"}
    again = ResumableLoader(_mixture(), micro_batch_size=4)
    again.load_state_dict(two.state_dict())
    assert again.consumed() == two.consumed() and again.position == 30
