"""Pairwise reward losses, vectorised over the batch.

Inputs are per-token values `[pairs, seq]` of chosen and rejected rows, their token ids and
attention masks (right or left padded). `end_index` finds each row's scored token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def end_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, from the mask alone (pad ids are never searched)."""
    seq_len = attention_mask.shape[-1]
    return seq_len - 1 - attention_mask.flip(-1).argmax(-1)


def bradley_terry_loss(chosen_end: torch.Tensor, rejected_end: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected) on the end scores, averaged over pairs."""
    return -F.logsigmoid(chosen_end - rejected_end).mean()


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


LOSSES = ("per_token", "end_token")
