"""What a collator hands the training loop: a `Batch` whose parts are kept apart, so nothing is taken
out of it before the forward.

- `inputs`: the token rows the model reads (`input_ids`, and `attention_mask` for padded rows);
- `layout`: how those rows are arranged, for batches that are not plain padded rows (packed
  documents, shared prompts, length chunks; `utils/data/collate.py`, `utils/data/packing.py`);
- `targets`: what the objective's loss compares the values with: `Ranking` for responses, `Steps`
  for a process reward model's solutions;
- bookkeeping the loop and evaluation read and the model never sees: each example's `source` and
  `index` in its data set, whether it is `real` (not a repeat that pads the last evaluation shard), and the step's
  `loss_denominator` with token-budget batches (`utils/data/sampler.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch

Parts = TypeVar("Parts")


def moved(parts: Parts, device: torch.device) -> Parts:
    """A copy of a dataclass of tensors with every tensor on `device` (no wait for pinned copies)."""
    return replace(parts, **{field.name: value.to(device, non_blocking=True)
                             for field in fields(parts) if torch.is_tensor(value := getattr(parts, field.name))})


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor | None = None  # [rows, width] for padded rows; packed rows use the layout


@dataclass
class Layout:
    """Packed rows: each token's position, segment (0 prompt, k + 1 response k, -1 padding) and document,
    and `row_index`, where each token of each one-response row lies in the packed rows (-1: padding).
    Chunked rows: `chunk_order`, the rows chunk after chunk, and `chunks`, each one's row count and width.
    Plain padded rows have none of these."""

    position_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    row_index: torch.Tensor | None = None
    chunk_order: torch.Tensor | None = None
    chunks: list[tuple[int, int]] | None = None


@dataclass
class Ranking:
    """Responses: per row its example (`group`, an index into the batch), `rank` (0 best, equal:
    unordered) and `length` (the answer's tokens); per example its `margin`. Rated responses add
    `labels`, [rows, attributes] (NaN: not rated)."""

    group: torch.Tensor
    rank: torch.Tensor
    margin: torch.Tensor
    labels: torch.Tensor | None = None
    length: torch.Tensor | None = None


@dataclass
class Steps:
    """A process reward model's steps, flattened row after row: whose step each is (`rows`), where it ends
    in its solution (`positions`) and in the flattened batch (`index`), its label and whether it has one."""

    rows: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor


@dataclass
class Batch:
    inputs: ModelInputs
    targets: Ranking | Steps
    layout: Layout
    source: torch.Tensor | None = None  # per example
    index: torch.Tensor | None = None  # per example: its position in its data set
    real: torch.Tensor | None = None  # per example, in evaluation
    loss_denominator: float | None = None

    def to(self, device: torch.device) -> Batch:
        return replace(self, inputs=moved(self.inputs, device), targets=moved(self.targets, device),
                       layout=moved(self.layout, device))
