"""Reward-model losses, vectorised over the batch (no Python loop over rows).

- `per_token_loss`: DeepSpeed-Chat's pairwise loss on per-token values `[pairs, seq]` over the span where the
  chosen and rejected answers differ (its default, kept for parity). `end_index` finds each row's scored token
  from the attention mask (right or left padded).
- `ranked_pair_loss`: InstructGPT's generalisation to K ranked responses per prompt (all ordered pairs, each prompt
  weighted equally), with an optional per-prompt margin (Llama 2) and reward centering (Eisenstein et al. 2023).
- `plackett_luce_loss`: the listwise likelihood of the whole ranking: each response is picked among those ranked
  no better than it (a strict ranking of K gives K-1 softmax terms, not K(K-1)/2 pairs).
- `step_loss`: binary cross-entropy at labelled steps, for process reward models.
- `length_decorrelation_loss`, `orthogonality_loss`: ODIN's terms for a quality and a length head (Chen et al.
  2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF", section 4), beside the ranking loss on their sum.
- `attribute_loss`: mean squared error over the rated cells of `[responses, attributes]` labels (NaN: not
  rated), for multi-attribute regression; `combined_labels` gives the pair loss its targets.

Ranked inputs are flat: `scores` [R] end rewards, `group` [R] prompt index (0..G-1), `rank` [R] (lower is better,
equal ranks are unordered).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rlhf_reward.utils.runtime import gather_uneven


def end_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, from the mask alone (pad ids are never searched)."""
    seq_len = attention_mask.shape[-1]
    return seq_len - 1 - attention_mask.flip(-1).argmax(-1)


def per_token_loss(chosen_values: torch.Tensor, rejected_values: torch.Tensor,
                   chosen_ids: torch.Tensor, rejected_ids: torch.Tensor,
                   chosen_mask: torch.Tensor, rejected_mask: torch.Tensor) -> torch.Tensor:
    """DeepSpeed-Chat's loss: -log sigmoid(v_chosen - v_rejected) averaged over the span from the
    first token where the two rows differ to the end of the longer one, then over pairs."""
    positions = torch.arange(chosen_ids.shape[1], device=chosen_ids.device)
    differs = (chosen_ids != rejected_ids) | (chosen_mask != rejected_mask)
    chosen_end, rejected_end = end_index(chosen_mask) + 1, end_index(rejected_mask) + 1
    start = torch.where(differs.any(-1), differs.int().argmax(-1), chosen_end - 1)
    stop = torch.where(differs.any(-1), torch.maximum(chosen_end, rejected_end), chosen_end)
    span = (positions >= start[:, None]) & (positions < stop[:, None])
    token_losses = torch.where(span, -F.logsigmoid(chosen_values - rejected_values), 0.0)
    return (token_losses.sum(-1) / span.sum(-1)).mean()


def ordered_pairs(group: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """[R, R] mask of ordered pairs: (i, j) share a prompt and i is ranked strictly better than j."""
    return (group[:, None] == group[None, :]) & (rank[:, None] < rank[None, :])


def _mean_over_groups(row_sums: torch.Tensor, row_counts: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean over groups with a positive count of sum(row_sums) / sum(row_counts) within the group.

    Group ids lie in [0, R), so an [R, R] membership mask sums each group without scatter (deterministic on GPU).
    A batch without any count gives a zero that stays connected to the graph of `row_sums`.
    """
    slots = torch.arange(group.numel(), device=group.device)
    member = slots[:, None] == group[None, :]
    sums = torch.where(member, row_sums[None, :], 0).sum(-1)
    counts = torch.where(member, row_counts[None, :], 0).sum(-1)
    return (sums / counts.clamp(min=1)).sum() / (counts > 0).sum().clamp(min=1)


def ranked_pair_loss(scores: torch.Tensor, group: torch.Tensor, rank: torch.Tensor,
                     margin: torch.Tensor | None = None, center_coefficient: float = 0.0) -> torch.Tensor:
    """InstructGPT's loss over all ordered pairs of K ranked responses per prompt.

    For each pair (i, j) of group g with rank_i < rank_j: -log sigmoid(s_i - s_j - margin_g)
    + center_coefficient * (s_i + s_j)^2; averaged over the group's pairs, then over groups having a pair.
    `margin` is per group ([G]); tied rows form no pair.
    """
    ordered = ordered_pairs(group, rank)
    diff = scores[:, None] - scores[None, :]
    if margin is not None:
        diff = diff - margin.to(scores.dtype)[group][:, None]
    pair_terms = -F.logsigmoid(diff)
    if center_coefficient:
        pair_terms = pair_terms + center_coefficient * (scores[:, None] + scores[None, :]).square()
    row_sums = torch.where(ordered, pair_terms, 0).sum(-1)
    return _mean_over_groups(row_sums, ordered.sum(-1), group)


def plackett_luce_loss(scores: torch.Tensor, group: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each prompt's ranking under Plackett-Luce, with Breslow ties.

    Each row i above its group's worst rank level contributes -(s_i - logsumexp_{j in group, rank_j >= rank_i} s_j);
    averaged over the group's terms, then over groups having a term.
    """
    same = group[:, None] == group[None, :]
    risk_set = same & (rank[:, None] <= rank[None, :])
    log_norm = torch.where(risk_set, scores[None, :], float("-inf")).logsumexp(-1)
    has_term = ordered_pairs(group, rank).any(-1)
    return _mean_over_groups(torch.where(has_term, log_norm - scores, 0), has_term.long(), group)


def step_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Process reward model loss: binary cross-entropy with logits at the labelled steps (mask True), averaged."""
    losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return torch.where(mask, losses, 0).sum() / mask.sum().clamp(min=1)


def attribute_loss(predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the rated cells; a NaN label (not rated) adds nothing to the loss or
    its gradient, whatever the prediction there."""
    rated = ~labels.isnan()
    errors = torch.where(rated, predicted - labels.nan_to_num().to(predicted.dtype), 0)
    return errors.square().sum() / rated.sum().clamp(min=1)


def combined_labels(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each response's weighted sum of its labels: the combined reward it should get; NaN where an
    attribute of non-zero weight is not rated."""
    known = (~labels.isnan() | (weights == 0)).all(-1)
    combined = labels.nan_to_num().double() @ weights.double()
    return torch.where(known, combined, torch.nan)


LOSSES = ("per_token", "end_token", "plackett_luce")


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors, differentiable; 0 where either side is (nearly) constant: a
    batch whose answers all have one length says nothing of length, and rounding noise is no signal."""
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.square().sum() * y.square().sum()).sqrt().clamp_min(eps)


def length_decorrelation_loss(quality: torch.Tensor, length_reward: torch.Tensor,
                              lengths: torch.Tensor) -> torch.Tensor:
    """ODIN's length loss, L_L = |rho(r_Q, L)| - rho(r_L, L) (section 4 of the paper): the quality
    reward uncorrelated with the answer's length L, the length reward correlated with it; rho is the
    Pearson correlation over the batch's answers. Shifted by 1 (1 - rho(r_L, L)) so that it is 0 at best."""
    lengths = lengths.to(quality.dtype)
    return pearson(quality, lengths).abs() + 1 - pearson(length_reward, lengths)


def orthogonality_loss(head: torch.Tensor) -> torch.Tensor:
    """ODIN's orthogonality loss, L_O = |W_Q^T W_L| (section 4), of the two rows of a `[2, width]` head,
    on unit-norm rows: the raw product could be made small by shrinking both heads instead of turning them apart."""
    quality, length = F.normalize(head.float(), dim=-1)
    return (quality @ length).abs()


def across_ranks(*local: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's 1-D tensors joined with every other rank's (counts may differ), in the first one's dtype
    (float32 at least), for a statistic over the step's whole batch (ODIN computes its correlations over
    the global batch). Only this rank's part carries gradient, scaled by the world size, so that the
    data-parallel mean of the ranks' gradients is the statistic's own gradient."""
    dtype = torch.promote_types(local[0].dtype, torch.float32)
    stacked = torch.stack([tensor.to(dtype) for tensor in local], 1)  # [answers, statistics]
    parts = gather_uneven(stacked)
    world = len(parts)
    parts[dist.get_rank() if world > 1 else 0] = world * stacked - (world - 1) * stacked.detach()  # world x gradient
    return tuple(torch.cat(parts).T)
