"""`ranking_metrics` (sort-based, O(R log R)) against its definition: the quadratic [R, R] computation it replaced,
copied here as the reference; and `report`'s per-prompt best / worst and pair counts against the loops they replaced.
The counts are integers (or halves) held in float64, so they must match exactly."""

import numpy as np
import pytest
import torch
from rlhf_reward.benchmarks.metrics import quadratic_ranking_metrics  # the former implementation: the definition

from step2_reward_model import report
from step2_reward_model.metrics import _segment_inversions, ranking_metrics

KEYS = ("pairs_correct", "pairs", "top1_correct", "groups_with_top1")


def assert_same_counts(scores: torch.Tensor, group: torch.Tensor, rank: torch.Tensor) -> dict:
    fast, slow = ranking_metrics(scores, group, rank), quadratic_ranking_metrics(scores, group, rank)
    for key in KEYS:
        assert fast[key].dtype == torch.float64 and fast[key].shape == ()
        assert fast[key].item() == slow[key].item(), (key, fast[key].item(), slow[key].item())
    return fast


def random_table(seed: int, groups: int, largest: int, score_levels: int, rank_levels: int):
    """Groups of 1 to `largest` rows (singletons included) with scattered ids, rows shuffled so that a group's rows
    are not adjacent, and few score and rank values so that both tie often (also at the best rank)."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, largest + 1, (groups,), generator=generator)
    ids = torch.randperm(10 * groups, generator=generator)[:groups] * 7 - 3 * groups  # negative ids too
    group = torch.repeat_interleave(ids, sizes)
    rows = len(group)
    rank = torch.randint(0, rank_levels, (rows,), generator=generator) * 5 - 2
    scores = torch.randint(0, score_levels, (rows,), generator=generator).double() / 4
    order = torch.randperm(rows, generator=generator)
    return scores[order], group[order], rank[order]


@pytest.mark.parametrize(("seed", "groups", "largest", "score_levels", "rank_levels"), [
    (0, 50, 6, 3, 3), (1, 200, 4, 5, 2), (2, 30, 25, 8, 6), (3, 5, 120, 20, 40), (4, 400, 2, 4, 2),
    (5, 1, 300, 1000, 300), (6, 80, 10, 2, 10),
])
def test_counts_equal_the_quadratic_definition(seed, groups, largest, score_levels, rank_levels):
    scores, group, rank = random_table(seed, groups, largest, score_levels, rank_levels)
    assert_same_counts(scores, group, rank)
    assert_same_counts(scores.float(), group.int(), rank)  # other dtypes, same counts


def test_continuous_scores_and_strict_rankings():
    generator = torch.Generator().manual_seed(7)
    group = torch.arange(300) // 5
    rank = torch.rand(60, 5, generator=generator).argsort(-1).flatten()  # a permutation of 0..4 per group
    counts = assert_same_counts(torch.randn(300, generator=generator), group, rank)
    assert counts["groups_with_top1"].item() == 60


def test_edge_cases():
    empty = ranking_metrics(torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert all(empty[key].dtype == torch.float64 and empty[key].item() == 0 for key in KEYS)  # the [0, 0] amin raised
    flat = assert_same_counts(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4, 4, 4]), torch.tensor([1, 1, 1]))
    assert flat["pairs"].item() == 0 and flat["groups_with_top1"].item() == 0
    single = assert_same_counts(torch.tensor([1.0]), torch.tensor([9]), torch.tensor([0]))
    assert single["groups_with_top1"].item() == 0
    tied_best = assert_same_counts(torch.tensor([2.0, 2.0, 1.0]), torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1]))
    assert tied_best["groups_with_top1"].item() == 0 and tied_best["pairs"].item() == 2
    tied_score = assert_same_counts(torch.tensor([3.0, 3.0, 1.0]), torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]))
    assert tied_score["top1_correct"].item() == 0 and tied_score["pairs_correct"].item() == 2.5
    signed_zero = assert_same_counts(torch.tensor([0.0, -0.0]), torch.tensor([1, 1]), torch.tensor([0, 1]))
    assert signed_zero["pairs_correct"].item() == 0.5


def test_nan_and_infinite_scores_count_as_the_comparisons_do():
    scores = torch.tensor([float("nan"), 1.0, 0.0, float("inf"), float("inf"), 2.0, 5.0, float("nan"), -float("inf")])
    group = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    rank = torch.tensor([1, 0, 2, 0, 1, 2, 0, 1, 2])
    assert_same_counts(scores, group, rank)
    generator = torch.Generator().manual_seed(8)
    scores, group, rank = random_table(8, 60, 6, 4, 3)
    scores[torch.rand(len(scores), generator=generator) < 0.1] = float("nan")
    assert_same_counts(scores, group, rank)


def test_segment_inversions():
    """Inverted pairs inside each segment, and each segment sorted, against the n x n count."""
    generator = np.random.default_rng(9)
    for n, bound, segments in [(0, 0, 0), (1, 1, 1), (7, 3, 1), (200, 50, 7), (333, 1000, 40), (64, 2, 64)]:
        values = generator.integers(0, max(bound, 1), n)
        segment = np.sort(generator.integers(0, segments, n))
        heads = np.ones(n, dtype=bool)
        heads[1:] = segment[1:] != segment[:-1]
        inverted = (segment[:, None] == segment[None, :]) & (values[:, None] > values[None, :])
        count, by_value = _segment_inversions(values, heads, bound)
        assert count == np.triu(inverted, 1).sum()
        np.testing.assert_array_equal(by_value, values[np.lexsort((values, segment))])


def test_one_huge_group_needs_no_square_memory():
    """Half a million rows in one group: an [R, R] mask would need 250 GB; counts from formulas."""
    n = 500_000
    rank = torch.arange(n) % 1000
    scores = -rank.double()  # every better rank scores strictly higher
    counts = ranking_metrics(scores, torch.zeros(n, dtype=torch.long), rank)
    pairs = (n * n - 1000 * (n // 1000) ** 2) // 2
    assert counts["pairs"].item() == counts["pairs_correct"].item() == pairs
    assert counts["groups_with_top1"].item() == 0
    reversed_counts = ranking_metrics(rank.double(), torch.zeros(n, dtype=torch.long), rank)
    assert reversed_counts["pairs_correct"].item() == 0


def loop_best_worst(prompts, targets):
    """`report.best_worst` as it was, a scan per prompt: the definition."""
    targets = np.asarray(targets, dtype=np.float64)
    best, worst = [], []
    for prompt in np.unique(prompts):
        members = np.flatnonzero((np.asarray(prompts) == prompt) & ~np.isnan(targets))
        if len(members) and np.ptp(targets[members]) > 0:
            best.append(members[np.argmax(targets[members])])
            worst.append(members[np.argmin(targets[members])])
    return np.asarray(best, dtype=np.int64), np.asarray(worst, dtype=np.int64)


def loop_pairwise(prompts, targets, rewards):
    """`attribute_report`'s comparisons and accuracy as they were: every pair listed."""
    outcomes = [(rewards[i] > rewards[j]) + 0.5 * (rewards[i] == rewards[j])
                for i in range(len(targets)) for j in range(len(targets))
                if prompts[i] == prompts[j] and targets[i] > targets[j]]
    return len(outcomes), (float(np.mean(outcomes)) if outcomes else None)


@pytest.mark.parametrize("seed", range(4))
def test_report_best_worst_and_attribute_pairs_equal_the_loops(seed):
    generator = np.random.default_rng(seed)
    n = 120
    prompts = np.array([f"p{k}" for k in generator.integers(0, 30, n)], dtype=object)
    targets = generator.integers(0, 4, n) / 2.0
    targets[generator.random(n) < 0.15] = np.nan
    rewards = generator.integers(0, 5, n).astype(np.float64)
    best, worst = report.best_worst(prompts, targets)
    expected_best, expected_worst = loop_best_worst(prompts, targets)
    np.testing.assert_array_equal(best, expected_best)
    np.testing.assert_array_equal(worst, expected_worst)
    result = report.attribute_report(np.zeros((n, 1)), targets[:, None], ["a"], rewards, prompts, targets)
    assert (result["comparisons"], result["pairwise_accuracy"]) == loop_pairwise(prompts, targets, rewards)
    sources, rejected = generator.choice(["x", "y", "z"], n), np.nan_to_num(targets)
    by_source = report.pair_report(rewards, rejected, rewards, rewards, rewards, sources)["by_source"]
    for name in "xyz":
        members = sources == name
        won = (rewards[members] > rejected[members]) + 0.5 * (rewards[members] == rejected[members])
        assert by_source[name] == {"pairs": int(members.sum()), "accuracy": float(won.mean())}
