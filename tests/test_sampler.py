"""Length-grouped batches: every example once per epoch, ranks in step, far less padding than a
plain shuffle, and still a different shuffle every epoch."""

from __future__ import annotations

import numpy as np
import pytest
from rlhf_reward.utils.data.collate import PairCollator, PairDataset, RowShapes
from rlhf_reward.utils.data.sampler import LengthGroupedBatches
from rlhf_reward.utils.data.tokenize import TokenizedExamples


def lengths(count: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(np.log(160), 0.5, size=count).astype(int) + 1


def padded_share(sampler: LengthGroupedBatches, sizes: np.ndarray) -> float:
    """Share of real tokens when each batch pads to its longest."""
    real = padded = 0
    for batch in sampler:
        real += sizes[batch].sum()
        padded += len(batch) * sizes[batch].max()
    return real / padded


@pytest.mark.parametrize("count,world_size", [(1000, 1), (1001, 2), (37, 4)])
def test_every_example_once_per_epoch_and_ranks_in_step(count, world_size):
    sizes = lengths(count)
    ranks = [LengthGroupedBatches(sizes, 8, rank, world_size, seed=3, window=16) for rank in range(world_size)]
    per_rank = [list(sampler) for sampler in ranks]
    assert {len(batches) for batches in per_rank} == {len(ranks[0])}
    for step in zip(*per_rank, strict=True):
        assert len({len(batch) for batch in step}) == 1 and len(step[0]) >= 1
    seen = np.concatenate([np.concatenate(batches) for batches in per_rank])
    assert set(seen) == set(range(count))
    assert len(seen) == ranks[0].total < count + world_size  # repeats only to even out the ranks


def test_grouping_cuts_padding():
    sizes = lengths()
    grouped = padded_share(LengthGroupedBatches(sizes, 8, seed=1, window=32), sizes)
    shuffled = padded_share(LengthGroupedBatches(sizes, 8, seed=1, window=0), sizes)
    assert shuffled < 0.6 and grouped > 0.9


def test_batches_change_every_epoch_and_the_longest_runs_first():
    sizes = lengths()
    sampler = LengthGroupedBatches(sizes, 8, seed=1, window=32)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sizes[batches[0]].max() == sizes.max()
        epochs.append({tuple(sorted(batch)) for batch in batches})
    assert len(epochs[0] & epochs[1]) < len(epochs[0]) / 2
    # The batch order is shuffled too: the lengths of consecutive batches do not just go down.
    means = [sizes[batch].mean() for batch in list(sampler)[1:]]
    assert not np.all(np.diff(means) <= 0)


def test_same_seed_same_batches():
    sizes = lengths()
    first = list(LengthGroupedBatches(sizes, 8, seed=5))
    assert first == list(LengthGroupedBatches(sizes, 8, seed=5))
    assert first != list(LengthGroupedBatches(sizes, 8, seed=6))


@pytest.mark.parametrize("window", [0, 16])
def test_an_epoch_started_part_way_gives_the_batches_not_yet_taken(window):
    """What a resumed run relies on: the same epoch from batch `start` is the rest of that epoch."""
    sizes = lengths(500)
    sampler = LengthGroupedBatches(sizes, 8, rank=1, world_size=2, seed=3, window=window)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start=11)
    assert list(sampler) == whole[11:]
    assert len(sampler) == len(whole)  # still the whole epoch: the schedule's length does not change
    sampler.set_epoch(3)
    assert len(list(sampler)) == len(whole)


def shapes(count: int, seed: int = 0) -> RowShapes:
    rng = np.random.default_rng(seed)
    return RowShapes(rng.integers(1, 5, size=count), lengths(count, seed) * 2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_with_shapes_an_epoch_is_still_seeded_complete_and_resumable(world_size):
    sizes, rows = lengths(500), shapes(500)
    samplers = [LengthGroupedBatches(sizes, 8, rank, world_size, seed=3, window=16, shapes=rows)
                for rank in range(world_size)]
    per_rank = [list(sampler) for sampler in samplers]
    assert set(np.concatenate([np.concatenate(batches) for batches in per_rank])) == set(range(500))
    assert per_rank[0] == list(LengthGroupedBatches(sizes, 8, 0, world_size, seed=3, window=16, shapes=rows))
    samplers[-1].set_epoch(0, start=7)
    assert list(samplers[-1]) == per_rank[-1][7:]


def ranked_and_pairs(seed: int = 0) -> PairDataset:
    """8 pairs with long prompts (300 tokens, answers of 10), 8 lists of four answers of 150 tokens
    to short prompts, and 48 short pairs. The long pairs hold the longest rows, but the lists cost
    more: 32 rows of 170 tokens unshared (16 of 310 for the pairs), and packed rows of 620
    tokens (320 for the pairs)."""
    rng = np.random.default_rng(seed)
    kinds = [(300, [10, 10])] * 8 + [(20, [150] * 4)] * 8 + \
        [(10, list(rng.integers(20, 60, size=2))) for _ in range(48)]
    data = TokenizedExamples(source_names=["hand"])
    for prompt, answers in kinds:
        data.prompts.append(np.ones(prompt, dtype=np.int32))
        data.responses.append([np.ones(answer, dtype=np.int32) for answer in answers])
        data.ranks.append(np.arange(len(answers), dtype=np.int32))
        data.margins.append(0.0)
        data.sources.append(0)
    return PairDataset(data)


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("world_size", [1, 2])
def test_the_batch_that_costs_most_memory_runs_first_not_the_one_with_the_longest_row(share_prompt, world_size):
    """What the model runs, collated: the first batch has the most rows x padded length, on every rank."""
    dataset = ranked_and_pairs()
    collate = PairCollator(0, share_prompt=share_prompt)
    ordered = [LengthGroupedBatches(dataset.lengths(share_prompt), 8 // world_size, rank, world_size, seed=1,
                                    window=16, shapes=dataset.row_shapes(share_prompt)) for rank in range(world_size)]
    by_length = LengthGroupedBatches(dataset.lengths(share_prompt), 8, seed=1, window=16)
    first_by_length = collate([dataset[i] for i in next(iter(by_length))]).inputs.input_ids
    for epoch in range(2):
        for sampler in ordered:
            sampler.set_epoch(epoch)
            sizes = [collate([dataset[i] for i in batch]).inputs.input_ids.numel() for batch in sampler]
            assert sizes[0] == max(sizes) > first_by_length.numel() // world_size


def test_the_first_batch_is_the_one_that_costs_most_on_any_rank():
    """Two global batches of 100-token examples: one where rank 1 gets two 8-row lists and rank 0 two
    single rows, one where every rank gets two 4-row lists. The first costs more, on rank 1."""
    sizes = np.array([100, 99, 98, 97, 50, 50, 50, 50])
    rows = RowShapes(np.array([1, 1, 8, 8, 4, 4, 4, 4]), np.full(8, 100))
    firsts = [next(iter(LengthGroupedBatches(sizes, 2, rank, 2, window=4, shapes=rows))) for rank in range(2)]
    assert firsts == [[0, 1], [2, 3]]
