"""Tokenised examples -> model batches: every example's best response, then every second response,
and so on (for pairs: all chosen rows, then all rejected rows), padded to the batch's longest.

Each row carries its example's index in the batch (`group`) and its rank (0 best, equal =
unordered), so pairs and ranked lists of any length share one layout. Padding goes on the right,
to the longest sequence of the batch rounded up to a multiple of 8 (never to `--max_seq_len`).
The pad id's value does not matter: the attention mask says which tokens are real and the model
scores the last real one.

With `share_prompt`, the model reads each example once: one packed row [prompt, response 1,
response 2, ...] whose position ids restart after the prompt for every response and whose
`segment_ids` (0 prompt, k + 1 response k, -1 padding) let the model mask each response from
the others. `row_index` maps every (row, position) of the layout above to its token in the
packed rows (-1 for padding), so the loss sees the same rows either way. With an `arrangement`,
several such documents share a row (`utils/data/packing.py`), with or without prefix sharing.

Unpacked rows of very different lengths waste compute on padding even in a length-grouped batch
(a pair's two responses differ; a ranked list's more so). With `chunk_tokens`, the collator also
splits the rows into chunks of similar length (`length_chunks`: `chunk_order`, the rows chunk after
chunk, and `chunks`, each one's row count and width) and the model runs one forward per chunk, cut
to its own longest row. It is worth it when a chunk saves more padded tokens than a forward's
fixed cost (`CHUNK_TOKENS`, by device type). The host computes this, so the step waits on no copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from rlhf_reward.utils.data.batch import Batch, Layout, ModelInputs, Ranking
from rlhf_reward.utils.data.packing import Document, pack_documents, plain_document, round_up
from rlhf_reward.utils.data.tokenize import TokenizedExamples
from torch.utils.data import Dataset

# The padded length at which a row's attention costs as much memory as the rest of its
# activations, for ordering batches. Eager attention keeps heads x length^2 scores per layer beside
# about 20 vectors of the hidden size (heads x head size) per token: they meet near 1300 tokens for
# heads of 64 (measured, Llama shapes). SDPA keeps one mask for all layers, so it meets far later;
# this lies between.
ATTENTION_WIDTH = 2048
# Padded tokens a chunk of rows must save to be worth a forward of its own, by device type: on the
# CPU a forward's fixed cost is a few tokens' worth; on an accelerator, kernel launches cost thousands.
CHUNK_TOKENS = {"cpu": 32}
ACCELERATOR_CHUNK_TOKENS = 2048


def chunk_tokens_for(device_type: str) -> int:
    """`CHUNK_TOKENS` of a device type: the CPU's, or any accelerator's."""
    return CHUNK_TOKENS.get(device_type, ACCELERATOR_CHUNK_TOKENS)


def padded_cost(rows: int, width: int) -> float:
    """Memory of `rows` rows padded to `width`, in tokens, their attention counted as tokens too."""
    return rows * width * (1 + width / ATTENTION_WIDTH)


@dataclass(frozen=True)
class RowShapes:
    """Per example, how many rows it adds to a batch and how long they are before padding: what a
    batch's memory depends on, as every row is padded to the batch's longest."""

    rows: np.ndarray
    widths: np.ndarray

    def size(self, batch: np.ndarray, multiple: int = 8) -> tuple[int, int]:
        """Rows of the batch of these examples, and the length they are padded to."""
        return int(self.rows[batch].sum()), round_up(int(self.widths[batch].max()), multiple)

    def cost(self, batch: np.ndarray) -> float:
        return padded_cost(*self.size(batch))


class PairDataset(Dataset):
    """One item per example: its prompt ids and its response ids (best first)."""

    def __init__(self, tokenized: TokenizedExamples):
        self.data = tokenized

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self, share_prompt: bool = False) -> np.ndarray:
        """The length to group examples by: the longest row, or with `share_prompt` the packed row
        per response, so that ranked lists still meet pairs in batches rather than all being
        grouped apart as the longer rows."""
        if not share_prompt:
            return np.array([len(prompt) + max(map(len, responses))
                             for prompt, responses in zip(self.data.prompts, self.data.responses, strict=True)])
        return np.array([(len(prompt) + sum(map(len, responses))) / len(responses)
                         for prompt, responses in zip(self.data.prompts, self.data.responses, strict=True)])

    def row_shapes(self, share_prompt: bool = False) -> RowShapes:
        """The rows each example adds to a batch: one per response, of prompt + its longest response,
        or with `share_prompt` one packed row of prompt + all responses."""
        pairs = list(zip(self.data.prompts, self.data.responses, strict=True))
        if share_prompt:
            return RowShapes(np.ones(len(pairs), dtype=np.int64),
                             np.array([len(prompt) + sum(map(len, responses)) for prompt, responses in pairs]))
        return RowShapes(np.array([len(responses) for _, responses in pairs]),
                         np.array([len(prompt) + max(map(len, responses)) for prompt, responses in pairs]))

    def tokens(self, share_prompt: bool = False) -> np.ndarray:
        """Each example's tokens once packed: prompt + all responses, or without `share_prompt` the
        prompt again with every response."""
        if share_prompt:
            return self.row_shapes(share_prompt=True).widths
        pairs = zip(self.data.prompts, self.data.responses, strict=True)
        return np.array([len(prompt) * len(responses) + sum(map(len, responses)) for prompt, responses in pairs])

    def loss_units(self) -> np.ndarray:
        """What the loss averages over, per example: one ranking (a pair or a ranked list)."""
        return np.ones(len(self))

    def __getitem__(self, index: int) -> dict:
        data = self.data
        return {"prompt": data.prompts[index], "responses": data.responses[index], "ranks": data.ranks[index],
                "margin": data.margins[index], "source": data.sources[index], "index": index}


class EvalShard(Dataset):
    """Rank `rank`'s share of an eval set, padded with repeats so every rank runs as many batches
    (ZeRO-3 forwards are collective); repeats are flagged so metrics count every row once."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.length = math.ceil(len(dataset) / world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        position = index * self.world_size + self.rank
        item = dict(self.dataset[position % len(self.dataset)])
        item["is_real"] = position < len(self.dataset)
        return item


def length_chunks(lengths: list[int], chunk_tokens: int, multiple: int = 8) -> list[tuple[list[int], int]]:
    """Rows (indices into `lengths`) in chunks of similar length, each with the width it is cut to
    (its longest, rounded up to `multiple`): the split with the fewest padded tokens plus
    `chunk_tokens` per chunk, by dynamic programming over the rows sorted longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    widths = [round_up(lengths[i], multiple) for i in order]
    # cost[j]: the best split of the first j rows; cut[j]: where its last chunk starts.
    cost, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):
            total = cost[i] + (j - i) * widths[i] + chunk_tokens
            if total < cost[j]:
                cost[j], cut[j] = total, i
    chunks, j = [], len(order)
    while j > 0:
        chunks.append((order[cut[j]:j], widths[cut[j]]))
        j = cut[j]
    return chunks[::-1]


def pad_right(rows: list[np.ndarray], pad_token_id: int, multiple: int = 8,
              width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` of token rows padded on the right to `width`, by default
    the longest row rounded up to `multiple`."""
    width = width or round_up(max(len(row) for row in rows), multiple)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
        attention_mask[i, :len(row)] = 1
    return input_ids, attention_mask


class PairCollator:
    """Stacks every example's response `k` as row block `k`; examples with fewer responses skip
    the later blocks. `margin`, `source` and `is_real` are per example, `group` and `rank` per row.
    `pad_to` pads every row to that length, as DeepSpeed-Chat does (for benchmarks). `chunk_tokens`
    adds length chunks to unpacked batches (see the module's docstring). `arrangement` ("fit" or
    "flat", see `utils/data/packing.py`) packs the documents, prompts with all their answers or
    (without `share_prompt`) with one each, several to a row; by default only shared prompts are
    packed, one per row."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int = 8, share_prompt: bool = False,
                 pad_to: int | None = None, chunk_tokens: int | None = None, arrangement: str | None = None):
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0  # masked out either way
        self.multiple = pad_to_multiple_of
        self.share_prompt = share_prompt
        self.pad_to = pad_to
        self.chunk_tokens = chunk_tokens
        self.arrangement = arrangement or ("row" if share_prompt else None)

    def __call__(self, items: list[dict]) -> Batch:
        placed = [(g, k) for k in range(max(len(item["responses"]) for item in items))
                  for g, item in enumerate(items) if k < len(item["responses"])]
        inputs, layout = self.packed(items, placed) if self.arrangement else self.unpacked(items, placed)
        labels = None
        if "labels" in items[0]:  # attribute-rated responses: a label vector per row, NaN where not rated
            labels = torch.from_numpy(np.stack([items[g]["labels"][k] for g, k in placed]))
        targets = Ranking(group=torch.tensor([g for g, _ in placed]),
                          rank=torch.tensor([int(items[g]["ranks"][k]) for g, k in placed]),
                          margin=torch.tensor([float(item["margin"]) for item in items]), labels=labels,
                          length=torch.tensor([len(items[g]["responses"][k]) for g, k in placed]))
        return Batch(inputs, targets, layout, **bookkeeping(items))

    def unpacked(self, items: list[dict], placed: list[tuple[int, int]]) -> tuple[ModelInputs, Layout]:
        rows = [np.concatenate([items[g]["prompt"], items[g]["responses"][k]]) for g, k in placed]
        input_ids, attention_mask = pad_right(rows, self.pad_token_id, self.multiple, self.pad_to)
        layout = Layout()
        if self.chunk_tokens is not None and self.pad_to is None:
            chunks = length_chunks([len(row) for row in rows], self.chunk_tokens, self.multiple)
            if len(chunks) > 1:
                layout = Layout(chunk_order=torch.tensor([i for members, _ in chunks for i in members]),
                                chunks=[(len(members), width) for members, width in chunks])
        return ModelInputs(input_ids, attention_mask), layout

    def packed(self, items: list[dict], placed: list[tuple[int, int]]) -> tuple[ModelInputs, Layout]:
        """Packed documents, and `row_index`: where each token of each response row lies in them."""
        row_len = [len(items[g]["prompt"]) + len(items[g]["responses"][k]) for g, k in placed]
        row_index = torch.full((len(placed), round_up(max(row_len), self.multiple)), -1, dtype=torch.long)
        if not self.share_prompt:
            documents = [plain_document(np.concatenate([items[g]["prompt"], items[g]["responses"][k]]))
                         for g, k in placed]
            inputs, layout, starts = pack_documents(documents, self.pad_token_id, self.arrangement, self.multiple)
            for r, length in enumerate(row_len):
                row_index[r, :length] = starts[r] + torch.arange(length)
            return inputs, replace(layout, row_index=row_index)
        inputs, layout, starts = pack_documents([shared_document(item) for item in items], self.pad_token_id,
                                                self.arrangement, self.multiple)
        for r, (g, k) in enumerate(placed):
            prompt, responses = len(items[g]["prompt"]), items[g]["responses"]
            offset = prompt + sum(len(resp) for resp in responses[:k])
            row_index[r, :prompt] = starts[g] + torch.arange(prompt)
            row_index[r, prompt:prompt + len(responses[k])] = starts[g] + offset + torch.arange(len(responses[k]))
        return inputs, replace(layout, row_index=row_index)


def bookkeeping(items: list[dict]) -> dict:
    """The batch's fields the model never reads: each example's source and index, whether it is real
    (evaluation shards), and the step's loss denominator (token-budget batches)."""
    found = {}
    for key in ("source", "index"):
        if key in items[0]:
            found[key] = torch.tensor([item[key] for item in items])
    if "is_real" in items[0]:
        found["real"] = torch.tensor([item["is_real"] for item in items])
    if "loss_denominator" in items[0]:
        found["loss_denominator"] = items[0]["loss_denominator"]
    return found


def shared_document(item: dict) -> Document:
    """[prompt, response 1, response 2, ...], each response placed right after the prompt (its
    positions) and seeing only the prompt and itself (its segment)."""
    prompt, responses = item["prompt"], item["responses"]
    return Document(np.concatenate([prompt, *responses]),
                    np.concatenate([np.zeros(len(prompt), dtype=np.int64)]
                                   + [np.full(len(resp), k + 1) for k, resp in enumerate(responses)]),
                    np.concatenate([np.arange(len(prompt))]
                                   + [len(prompt) + np.arange(len(resp)) for resp in responses]))
