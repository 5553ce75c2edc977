"""Evaluation counts, computed on the device as float64 sums so that ranks can all-reduce or gather
them before dividing, and the accuracies made from them.

- `ranking_metrics`: ordered pairs of a prompt's responses scored in the right order, and top-1 counts.
- `step_metrics`: a process reward model's labelled steps, solutions and first errors predicted right.
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


def step_metrics(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, step_rows: torch.Tensor,
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Evaluation counts over the labelled steps (`mask`), as float64 sums.

    A step is predicted good when sigmoid(logit) > 0.5. steps / steps_correct: labelled steps and those predicted
    right. solutions: rows with a labelled step; solutions_correct: those where "every labelled step is good" is
    predicted right; first_error_correct: those where the first bad labelled step (or that there is none) is
    predicted right. Steps must be flattened row by row, in order, as `StepCollator` does.

    Rows are summed through a [batch, S] membership mask rather than scatter ops: deterministic on GPU, and small.
    """
    count = logits.numel()
    predicted_bad = mask & (logits.detach() <= 0)
    bad = mask & (labels <= 0.5)
    member = torch.arange(batch_size, device=step_rows.device)[:, None] == step_rows[None, :]
    index = torch.arange(count, device=step_rows.device)

    def first(flags: torch.Tensor) -> torch.Tensor:  # each row's first flagged step, or `count` for none
        return torch.where(member & flags, index, count).amin(-1)

    solutions = (member & mask).any(-1)
    all_good_right = (member & predicted_bad).any(-1) == (member & bad).any(-1)
    return {"steps": mask.sum().double(), "steps_correct": (mask & (predicted_bad == bad)).sum().double(),
            "solutions": solutions.sum().double(), "solutions_correct": (solutions & all_good_right).sum().double(),
            "first_error_correct": (solutions & (first(predicted_bad) == first(bad))).sum().double()}
