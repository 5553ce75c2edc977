"""Evaluation counts, returned on the device as float64 sums so that ranks can all-reduce or gather
them before dividing, and the accuracies made from them.

- `ranking_metrics`: ordered pairs of a prompt's responses scored in the right order, and top-1 counts
  (`ranking_counts`: the same from numpy arrays).
- `ranking_accuracies`: pairwise and top-1 accuracy from `ranking_metrics`' counts.
"""

from __future__ import annotations

import numpy as np
import torch


def _dense(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Each value's index among the sorted distinct values, and their number. Integers spanning less than four
    times their count (prompt and rank ids) are indexed through a table of that span rather than sorted."""
    n = len(values)
    if values.dtype.kind in "ub":
        values = values.astype(np.int64)
    if n and values.dtype.kind == "i" and int(values.max()) - int(values.min()) < 4 * n:
        offset = values - values.min()
        present = np.zeros(int(offset.max()) + 1, dtype=bool)
        present[offset] = True
        index = np.cumsum(present) - 1
        return index[offset], int(index[-1]) + 1
    order = np.argsort(values)
    heads = _heads(values[order])
    dense = np.empty(n, dtype=np.int64)
    dense[order] = np.cumsum(heads) - 1
    return dense, int(heads.sum())


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable") for integers in [0, len(keys)): np.sort of keys * n + position, as sorting
    values is several times faster than argsort."""
    n = len(keys)
    return np.sort(keys * n + np.arange(n)) % n


def _heads(*keys: np.ndarray) -> np.ndarray:
    """Where a run of equal keys begins in rows sorted by them."""
    heads = np.zeros(len(keys[0]), dtype=bool)
    heads[:1] = True
    for key in keys:
        heads[1:] |= key[1:] != key[:-1]
    return heads


def _pairs_within(heads: np.ndarray) -> int:
    """Unordered pairs of rows inside each run, from where the runs begin."""
    sizes = np.diff(np.append(np.flatnonzero(heads), len(heads)))
    return int((sizes * (sizes - 1) // 2).sum())


def _segment_inversions(values: np.ndarray, heads: np.ndarray, bound: int) -> tuple[int, np.ndarray]:
    """Pairs p < q in one segment (segments begin at `heads`) with values[p] > values[q], for integers in
    [0, bound), in O(n log bound) time; and the values sorted within each segment.

    A most-significant-bit-first radix sort: rows of a segment that share the bits above b form a contiguous
    bucket in their original order; its pairs that first differ at bit b are inverted when the earlier row has the
    bit set, so each bit-0 row adds the bit-1 rows before it in its bucket. Each bucket is then split stably,
    bit-0 rows first, for the next bit. A bucket of one or two rows is settled directly and leaves, so pairs of
    answers finish at once and lists after a few bits. Each step is a cumulative sum, gather or scatter over the
    rows left.
    """
    result, heads = values.copy(), heads.copy()
    slots = np.arange(len(values))  # the place in `result` of each row left
    total = 0
    for b in reversed(range(max(bound - 1, 0).bit_length())):
        first = np.flatnonzero(heads)
        sizes = np.diff(np.append(first, len(heads)))
        if (sizes <= 2).any():  # settle buckets of one row and of two (all of them for pairs of answers) at once
            stay = np.repeat(sizes > 2, sizes)
            result[slots[~stay]] = values[~stay]
            low, high = first[sizes == 2], first[sizes == 2] + 1
            total += int(np.count_nonzero(values[low] > values[high]))
            result[slots[low]], result[slots[high]] = (np.minimum(values[low], values[high]),
                                                       np.maximum(values[low], values[high]))
            values, heads, slots, sizes = values[stay], heads[stay], slots[stay], sizes[sizes > 2]
            first = np.cumsum(sizes) - sizes
            if not len(values):
                break
        start, end = np.repeat(first, sizes), np.repeat(first + sizes, sizes)
        bit = (values >> b) & 1
        ones = np.concatenate([[0], np.cumsum(bit)])  # ones[k]: set bits among the first k rows
        below = ones[start]
        before = ones[:-1] - below  # set bits before each row in its bucket
        zero = bit == 0
        total += int(before.sum(where=zero))
        split = end - (ones[end] - below)  # where the bucket's bit-1 rows begin once split
        moved = np.empty_like(values)
        moved[np.where(zero, np.arange(len(values)) - before, split + before)] = values
        cut = split[first]
        heads[cut[(cut > first) & (cut < first + sizes)]] = True
        values = moved
    result[slots] = values
    return total, result


def ranking_counts(scores: np.ndarray, group: np.ndarray, rank: np.ndarray) -> dict[str, float]:
    """`ranking_metrics`' counts as python numbers, from numpy arrays (`report` counts rated answers with it).

    Group and rank ids are any sortable values (ranks: lower is better); a NaN score is neither above nor tied
    with anything. With the rows sorted by (group, rank, score), pairs are a group's pairs less those within one
    rank, and the pairs with s_i > s_j the inversions of the scores within each group's run: O(R log R) time and
    O(R) memory whatever the group sizes.
    """
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    group, groups = _dense(np.asarray(group).reshape(-1))
    rank = _dense(np.asarray(rank).reshape(-1))[0]
    known = ~np.isnan(values)
    score = np.zeros(len(values), dtype=np.int64)
    score[known], score_levels = _dense(values[known])
    order = _stable_order(score)
    for key in (rank, group):
        order = order[_stable_order(key[order])]
    group, rank, score, known = group[order], rank[order], score[order], known[order]

    group_heads, place_heads = _heads(group), _heads(group, rank)
    group_sizes = np.diff(np.append(np.flatnonzero(group_heads), len(group)))
    best_sizes = np.diff(np.append(np.flatnonzero(place_heads), len(group)))[np.cumsum(place_heads)[group_heads] - 1]
    sole_best = (best_sizes == 1) & (group_sizes >= 2)  # per group, its best rows first in its run
    pairs = _pairs_within(group_heads) - _pairs_within(place_heads)

    has_nan = np.bincount(group[~known], minlength=groups) > 0
    group, rank, score = group[known], rank[known], score[known]
    heads = _heads(group)
    concordant, by_score = _segment_inversions(score, heads, score_levels)
    ties = _pairs_within(_heads(group, by_score)) - _pairs_within(_heads(group, rank, score))
    starts = np.flatnonzero(heads)
    segment = np.cumsum(heads) - 1
    top = by_score[np.append(starts, len(group))[1:] - 1]  # each group's highest score
    at_top = np.bincount(segment[score == top[segment]], minlength=len(starts))
    ids = group[starts]
    correct = sole_best[ids] & ~has_nan[ids] & (score[starts] == top) & (at_top == 1)
    return {"pairs_correct": concordant + 0.5 * ties, "pairs": float(pairs), "top1_correct": float(correct.sum()),
            "groups_with_top1": float(sole_best.sum())}


def ranking_metrics(scores: torch.Tensor, group: torch.Tensor, rank: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluation counts, as float64 sums so that they can be all-reduced before dividing.

    pairs: ordered pairs (rank_i < rank_j in one group); pairs_correct: those with s_i > s_j, a score tie counting 0.5.
    groups_with_top1: groups of at least 2 rows with exactly one row at the best rank level;
    top1_correct: those where that row's score is strictly above every other row's (a score tie counts 0).

    Counted on the host by `ranking_counts` in O(R log R) time and O(R) memory: the evaluation table gathers every
    held-out row (a million rows would need terabytes as [R, R] masks); the sums come back on the scores' device.
    """
    counts = ranking_counts(scores.detach().to("cpu", torch.float64).numpy(), group.cpu().numpy(), rank.cpu().numpy())
    return {key: torch.tensor(value, dtype=torch.float64, device=scores.device) for key, value in counts.items()}


def ranking_accuracies(counts: dict[str, torch.Tensor | float]) -> dict[str, float | None]:
    """Pairwise accuracy (ties in score count half) and top-1 accuracy; None where there is nothing to count."""
    pairs, groups = float(counts["pairs"]), float(counts["groups_with_top1"])
    return {"pairwise_accuracy": float(counts["pairs_correct"]) / pairs if pairs else None,
            "top1_accuracy": float(counts["top1_correct"]) / groups if groups else None}
