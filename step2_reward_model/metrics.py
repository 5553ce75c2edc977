"""Evaluation counts, computed on the device as float64 sums so that ranks can all-reduce or gather
them before dividing, and the accuracies made from them.

- `ranking_metrics`: ordered pairs of a prompt's responses scored in the right order, and top-1 counts.
- `ranking_accuracies`: pairwise and top-1 accuracy from `ranking_metrics`' counts.
"""

from __future__ import annotations

import torch

from step2_reward_model.losses import ordered_pairs


def ranking_metrics(scores: torch.Tensor, group: torch.Tensor, rank: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluation counts, as float64 sums so that they can be all-reduced before dividing.

    pairs: ordered pairs (rank_i < rank_j in one group); pairs_correct: those with s_i > s_j, a score tie counting 0.5.
    groups_with_top1: groups of at least 2 rows with exactly one row at the best rank level;
    top1_correct: those where that row's score is strictly above every other row's (a score tie counts 0).
    """
    scores = scores.detach()
    same = group[:, None] == group[None, :]
    ordered = ordered_pairs(group, rank)
    above = scores[:, None] > scores[None, :]
    tied = scores[:, None] == scores[None, :]
    pairs_correct = (ordered & above).sum().double() + 0.5 * (ordered & tied).sum().double()
    best_rank = torch.where(same, rank[None, :], torch.iinfo(rank.dtype).max).amin(-1)
    is_best = rank == best_rank
    sole_best = is_best & ((same & is_best[None, :]).sum(-1) == 1) & (same.sum(-1) >= 2)
    top1_correct = sole_best & (above | ~ordered).all(-1)
    return {"pairs_correct": pairs_correct, "pairs": ordered.sum().double(),
            "top1_correct": top1_correct.sum().double(), "groups_with_top1": sole_best.sum().double()}


def ranking_accuracies(counts: dict[str, torch.Tensor | float]) -> dict[str, float | None]:
    """Pairwise accuracy (ties in score count half) and top-1 accuracy; None where there is nothing to count."""
    pairs, groups = float(counts["pairs"]), float(counts["groups_with_top1"])
    return {"pairwise_accuracy": float(counts["pairs_correct"]) / pairs if pairs else None,
            "top1_accuracy": float(counts["top1_correct"]) / groups if groups else None}
