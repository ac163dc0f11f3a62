"""The loader's global data position: any number of processes continues the same samples, another
global batch continues exactly or is refused naming the sizes that work, changed data is refused
unless accepted. (Mixtures: test_mixture.py; streaming sources: test_hf_sources.py.)"""

from __future__ import annotations

import pytest

from moe_lm.data.loader import ResumableLoader
from moe_lm.errors import UserError
from tests.unit.test_data import _ids, _ids_blocks


def _flat(loader: ResumableLoader, batches: int) -> list[int]:
    return [i for _ in range(batches) for i in _ids(loader.next_batch()[0])]


def test_the_position_is_global_any_world_size_continues_the_same_samples() -> None:
    """Saved by one process, resumed by each of two (and back): the ranks together draw exactly
    the samples the uninterrupted process draws next. The state is the same on every rank."""
    one = ResumableLoader(_ids_blocks(), micro_batch_size=4, seed=3)
    _flat(one, 2)
    state = one.state_dict()
    ranks = [ResumableLoader(_ids_blocks(), micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for r in ranks:
        assert r.load_state_dict(state) == []  # same global batch: nothing to say
    for _ in range(5):  # crosses the epoch end (5 batches of 4 per epoch)
        together = sorted(_ids(ranks[0].next_batch()[0]) + _ids(ranks[1].next_batch()[0]))
        assert together == sorted(_ids(one.next_batch()[0]))
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    back = ResumableLoader(_ids_blocks(), micro_batch_size=4)
    back.load_state_dict(ranks[1].state_dict())
    assert _flat(back, 3) == _flat(one, 3)


def test_a_changed_global_batch_continues_exactly_or_names_the_sizes_that_would() -> None:
    ref = ResumableLoader(_ids_blocks(), micro_batch_size=2, seed=5)
    _flat(ref, 4)  # 8 samples into epoch 0
    state = ref.state_dict()
    bigger = ResumableLoader(_ids_blocks(), micro_batch_size=4)
    notes = bigger.load_state_dict(state)
    assert notes == [
        "the global batch changed from 2 to 4 samples (train.micro_batch_size × processes); the sample "
        "stream continues exactly where the checkpoint stopped"
    ]
    assert _flat(bigger, 2) == _flat(ref, 4)  # samples 8..15 of the same order
    with pytest.raises(UserError) as info:
        ResumableLoader(_ids_blocks(), micro_batch_size=3).load_state_dict(state)
    assert str(info.value) == (
        "the checkpoint stopped 8 samples into epoch 0, which the new global batch 3 (train.micro_batch_size 3 × "
        "1 process(es)) does not divide, so the sample stream cannot continue exactly; with 1 process(es) use "
        "train.micro_batch_size 1, 2, 4, 8 (the checkpoint's global batch was 2)"
    )
    with pytest.raises(UserError, match=r"with 2 process\(es\) use train.micro_batch_size 1, 2, 4 \("):
        ResumableLoader(_ids_blocks(), micro_batch_size=3, dp_size=2).load_state_dict(state)
    odd = ResumableLoader(_ids_blocks(), micro_batch_size=3, seed=5)
    _flat(odd, 1)
    with pytest.raises(UserError, match=r"no train.micro_batch_size does with 2 processes; .* \(1, 3\)"):
        ResumableLoader(_ids_blocks(), micro_batch_size=1, dp_size=2).load_state_dict(odd.state_dict())


def test_changed_data_is_refused_unless_accepted() -> None:
    ref = ResumableLoader(_ids_blocks(), micro_batch_size=2, seed=5)
    _flat(ref, 2)
    state = ref.state_dict()
    same_size = _ids_blocks().clone()
    same_size[3, 2] += 1  # one token differs, the block count does not
    with pytest.raises(
        UserError, match=r"source 'corpus' holds other tokens .* train.accept_changed_data=true"
    ):
        ResumableLoader(same_size, micro_batch_size=2).load_state_dict(state)
    fewer = ResumableLoader(_ids_blocks()[:21], micro_batch_size=2)
    notes = fewer.load_state_dict(state, accept_changed_data=True)
    assert notes == [
        "train.accept_changed_data: source 'corpus' had 23 training blocks, now 21; training continues at the "
        "checkpoint's sample position over the new data, and validation is re-cut from the new data"
    ]
    assert fewer.position == 2 and fewer.changed_sources == {"corpus"}


def _mixture(micro_batch_size: int) -> ResumableLoader:
    from moe_lm.data.blocks import as_blocks
    from moe_lm.data.loader import TrainSource

    other = _ids_blocks() + 1000 * _ids_blocks().numel()  # its blocks' ids are 1000·N and up
    sources = [
        TrainSource("corpus", 3.0, as_blocks(_ids_blocks())),
        TrainSource("web", 1.0, as_blocks(other)),
    ]
    return ResumableLoader(sources, micro_batch_size=micro_batch_size, seed=5)


def _corpus_blocks(loader: ResumableLoader, count: int) -> list[int]:
    drawn: list[int] = []
    while len(drawn) < count:
        drawn += [i for i in _ids(loader.next_batch()[0]) if i < 1000]
    return drawn[:count]


def test_one_source_resumed_as_a_mixture_continues_its_epoch_where_it_stood() -> None:
    """Epoch 1 of one source, 8 samples in (its epochs are 20 of the 23 blocks: whole batches); as
    a mixture the source goes on with the rest of epoch 1's order, not back into epoch 0's."""
    single = ResumableLoader(_ids_blocks(), micro_batch_size=4, seed=5)
    _flat(single, 7)
    assert (single.epoch, single.position) == (1, 2)
    mixed = _mixture(4)
    mixed.load_state_dict(single.state_dict())
    assert _corpus_blocks(mixed, 12) == _flat(single, 3)


def test_a_mixture_resumed_as_one_source_continues_the_source_s_epoch() -> None:
    """The source had served 31 samples, with 23 blocks an epoch: 8 into epoch 1 (not 11 into epoch
    1 of 20-sample epochs). A place inside a batch is refused unless accepted."""
    mixed = _mixture(4)
    _flat(mixed, 3)
    state = mixed.state_dict()
    [corpus] = [s for s in state["sources"] if s["name"] == "corpus"]
    corpus["consumed"] = 31
    resumed = ResumableLoader(_ids_blocks(), micro_batch_size=4, seed=5)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (1, 2)
    reference = ResumableLoader(_ids_blocks(), micro_batch_size=4, seed=5)
    _flat(reference, 7)  # epoch 1, 8 samples in
    assert _flat(resumed, 3) == _flat(reference, 3)

    corpus["consumed"] = 30  # 7 into epoch 1: not a whole batch of 4
    with pytest.raises(
        UserError, match=r"7 samples into its epoch 1, .* train.accept_changed_data=true"
    ) as info:
        ResumableLoader(_ids_blocks(), micro_batch_size=4, seed=5).load_state_dict(state)
    assert "\n" not in str(info.value)
    accepted = ResumableLoader(_ids_blocks(), micro_batch_size=4, seed=5)
    notes = accepted.load_state_dict(state, accept_changed_data=True)
    assert (accepted.epoch, accepted.position) == (1, 2) and any("skips 1 sample" in n for n in notes)


def test_one_source_under_another_name_is_refused_never_restarted() -> None:
    """Its files moved into data.sources.web (or back to data.train_files): the run used to start the
    data over, silently. The order of a source's blocks follows its name, so the line says which name
    continues exactly."""
    from moe_lm.data.blocks import as_blocks
    from moe_lm.data.loader import TrainSource

    ref = ResumableLoader([TrainSource("web", 1.0, as_blocks(_ids_blocks()))], micro_batch_size=2, seed=5)
    _flat(ref, 3)
    state = ref.state_dict()
    with pytest.raises(UserError) as info:
        ResumableLoader(_ids_blocks(), micro_batch_size=2).load_state_dict(state)
    assert "source 'web' holds the same tokens as this run's 'corpus'" in str(info.value)
    assert "name it 'web' again (data.sources.web) to continue exactly" in str(info.value)
    assert "train.accept_changed_data=true" in str(info.value) and "\n" not in str(info.value)
    other = _ids_blocks().clone()
    other[0, 0] += 1
    with pytest.raises(UserError, match=r"the checkpoint's sources are \['web'\], this run's \['corpus'\]"):
        ResumableLoader(other, micro_batch_size=2).load_state_dict(state)
    again = ResumableLoader([TrainSource("web", 1.0, as_blocks(_ids_blocks()))], micro_batch_size=2)
    assert again.load_state_dict(state) == [] and _flat(again, 4) == _flat(ref, 4)
