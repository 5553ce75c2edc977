"""Padding-free batch layouts: documents packed into rows.

A document is what the model reads in one piece: a prompt with all its answers (prefix sharing),
a prompt with one answer, or a step-labelled solution. `pack_documents` lays documents into rows
in one of three arrangements:

    row   one document per row, padded to the longest (the prefix-shared layout without a budget)
    fit   first-fit into rows as wide as the longest document: several documents per row, padding
          only at row ends; for attention that computes every block of a row (SDPA, eager), where
          a row's cost grows with its width squared
    flat  one row of every document end to end; for kernels that skip what a document cannot see
          (FlexAttention's block mask, flash-attention's variable-length kernel)

Every token carries its document id, segment id (0 prompt, k + 1 answer k) and position id
(restarting in each document, and after the prompt for every answer): the model's attention
mask follows from them (`step2_reward_model/model.py`). Padding is document -1, segment -1,
position 0: each padding token a sequence of its own to flash-attention, and never past the
model's position table, however wide the row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rlhf_reward.utils.data.batch import Layout, ModelInputs

# FlexAttention's block size: a flat row is padded to a multiple of it, so no block is partial and
# the compiled kernel sees few distinct lengths.
FLEX_BLOCK = 128
# Attention kernels that skip, and keep nothing of, what a document cannot see: they take one flat
# row (and their activations grow with tokens, not tokens^2). SDPA and eager compute every block
# of a row, so they take first-fit rows.
VARLEN_ATTENTION = ("flex_attention", "flash_attention_2")


def arrangement_for(attention: str | None) -> str:
    """How token-budget documents are packed for the model's attention (measured on the CPU: one
    flat row with SDPA ran 0.62x as fast as first-fit rows, its attention spanning the budget)."""
    return "flat" if attention in VARLEN_ATTENTION else "fit"


def pad_multiple(attention: str | None) -> int:
    """Rows are padded to a multiple of 8, or of FlexAttention's block size."""
    return FLEX_BLOCK if attention == "flex_attention" else 8


def round_up(length: int, multiple: int) -> int:
    return multiple * math.ceil(length / multiple)


@dataclass(frozen=True)
class Document:
    ids: np.ndarray
    segments: np.ndarray
    positions: np.ndarray


def first_fit(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` in bins of at most `capacity`: largest first, each into the first bin with
    room (first-fit decreasing). An item larger than `capacity` gets a bin of its own."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        slot = next((b for b, left in enumerate(room) if sizes[i] <= left), None)
        if slot is None:
            bins.append([i])
            room.append(capacity - sizes[i])
        else:
            bins[slot].append(i)
            room[slot] -= sizes[i]
    return bins


def arrange(lengths: list[int], arrangement: str, multiple: int) -> tuple[list[list[int]], int]:
    """The documents of each row, and the rows' width."""
    if arrangement == "flat":
        return [list(range(len(lengths)))], round_up(sum(lengths), multiple)
    width = round_up(max(lengths), multiple)
    if arrangement == "row":
        return [[i] for i in range(len(lengths))], width
    return first_fit(lengths, width), width


def pack_documents(documents: list[Document], pad_token_id: int, arrangement: str = "row",
                   multiple: int = 8) -> tuple[ModelInputs, Layout, list[int]]:
    """The packed rows (their ids; their positions, segments and documents as the layout) and where
    each document starts in them, as an index into the flattened rows."""
    rows, width = arrange([len(doc.ids) for doc in documents], arrangement, multiple)
    shape = (len(rows), width)
    input_ids = np.full(shape, pad_token_id, dtype=np.int64)
    position_ids = np.zeros(shape, dtype=np.int64)
    segment_ids = np.full(shape, -1, dtype=np.int64)
    document_ids = np.full(shape, -1, dtype=np.int64)
    starts = [0] * len(documents)
    for r, members in enumerate(rows):
        column = 0
        for d in members:
            doc, span = documents[d], slice(column, column + len(documents[d].ids))
            input_ids[r, span], position_ids[r, span], segment_ids[r, span] = doc.ids, doc.positions, doc.segments
            document_ids[r, span] = d
            starts[d] = r * width + column
            column = span.stop
    layout = Layout(position_ids=torch.from_numpy(position_ids), segment_ids=torch.from_numpy(segment_ids),
                    document_ids=torch.from_numpy(document_ids))
    return ModelInputs(torch.from_numpy(input_ids)), layout, starts


def plain_document(ids: np.ndarray) -> Document:
    """One sequence read causally from its start: an unshared row, or a solution."""
    return Document(np.asarray(ids), np.zeros(len(ids), dtype=np.int64), np.arange(len(ids)))
