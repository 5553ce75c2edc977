"""Length-grouped batches: every example once per epoch, ranks in step, far less padding than a
plain shuffle, and still a different shuffle every epoch."""

from __future__ import annotations

import numpy as np
import pytest

from utils.data.sampler import LengthGroupedBatches


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
