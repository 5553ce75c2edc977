"""Step-wise data for process reward models (PRM): one label per reasoning step instead of one per answer.

A row is `{"prompt", "steps" (or "completions"), "labels"}`, as in PRM800K and Math-Shepherd. Labels come in
several conventions (booleans; 1 good / 0 neutral / -1 wrong; null for steps nobody rated, as after the first
error in PRM800K), so they are normalised here to 1 (good), 0 (bad) or None (unlabelled), with an explicit
policy for "neutral". Malformed rows follow the `--bad_rows` policy and unusable ones are dropped and counted, as
for preference pairs (`utils.data.examples`).

Each step is tokenised on its own followed by the separator, the way a policy generates it in the PPO step,
and is scored at the last token of that segment, where the step is complete. The prompt ends with the
separator too, so the first step starts on its own as the others do. Truncation cuts the prompt from
the left first (as for pairs) and then drops whole trailing steps, so a step is never scored on half its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
import torch
from rlhf_reward.utils.data.batch import Batch, Layout, ModelInputs, Steps
from rlhf_reward.utils.data.collate import RowShapes, bookkeeping, pad_right
from rlhf_reward.utils.data.examples import Outcome, judge_rows
from rlhf_reward.utils.data.fields import Malformed, as_object, as_text, list_of, required
from rlhf_reward.utils.data.packing import pack_documents, plain_document
from rlhf_reward.utils.data.ragged import pack, unpack
from rlhf_reward.utils.data.tokenize import encode_bounded, encode_tails, special_affixes
from rlhf_reward.utils.files import atomic_write
from torch.utils.data import Dataset

NEUTRAL = ("positive", "negative", "ignore")
UNLABELLED = -1.0  # stored label of a step that is not scored


class StepExample(TypedDict):
    prompt: str
    steps: list[str]
    labels: list[int | None]  # 1 good, 0 bad, None unlabelled
    source: str


def _label(value: Any, neutral: str, name: str) -> int | None:
    """Booleans and 1 / -1 map to good / bad, 0 follows the neutral policy, null is unlabelled."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (1, 0, -1):
        if value == 0:
            return {"positive": 1, "negative": 0, "ignore": None}[neutral]
        return int(value > 0)
    raise Malformed(f"{name} is not a step label", " (true, false, 1, 0, -1 or null)")


def _step_outcome(row: Any, neutral: str, source: str) -> Outcome:
    """(example, None) or (None, the reason a well-formed row cannot be used); Malformed for the others."""
    row = as_object(row)
    steps_key = "completions" if "completions" in row and "steps" not in row else "steps"
    prompt = as_text(required(row, "prompt"), "field 'prompt'")
    steps = list_of(row, steps_key, as_text, "texts")
    labels = list_of(row, "labels", lambda value, name: _label(value, neutral, name), "step labels")
    if len(labels) != len(steps):
        raise Malformed(f"fields 'labels' and '{steps_key}' differ in length",
                        f" ({len(labels)} labels, {len(steps)} steps)")
    if not prompt.strip():
        return None, "empty prompt"
    if not steps:
        return None, "no steps"
    if not all(step.strip() for step in steps):
        return None, "empty step"
    if all(label is None for label in labels):
        return None, "no labelled step"
    return StepExample(prompt=prompt, steps=steps, labels=labels, source=source), None


def judge_step_rows(rows: list[tuple[str, Any]], source: str, neutral: str = "positive",
                    bad_rows: str = "error") -> list[Outcome]:
    """Each step-wise row's outcome (see `utils.data.examples.judge_rows`).

    `neutral` says what a 0 label means: "positive" (good, PRM800K's own reading: the step is not a mistake),
    "negative" (bad) or "ignore" (unlabelled). Equal rows are kept: PRM800K rates some trajectories more
    than once (416 of the 3693 in the sample), and each rating counts.
    """
    if neutral not in NEUTRAL:
        raise ValueError(f"neutral must be one of {', '.join(NEUTRAL)}, not {neutral!r}")
    return judge_rows(rows, lambda _, row: _step_outcome(row, neutral, source), bad_rows)


@dataclass
class TokenizedSteps:
    """Token ids of step-wise examples with, per example, the scored position and label (-1.0: unlabelled) of
    every step kept."""

    sequences: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    source_names: list[str] = field(default_factory=list)
    truncated: int = 0
    too_long: int = 0

    def __len__(self) -> int:
        return len(self.sequences)


def _last_label_only(labels: list[int | None]) -> list[int | None]:
    last = max(i for i, label in enumerate(labels) if label is not None)
    return [label if i == last else None for i, label in enumerate(labels)]


def tokenize_steps(examples: list[StepExample], tokenizer, max_seq_len: int, separator: str = "\n\n",
                   last_step_only: bool = False) -> TokenizedSteps:
    """Examples -> `[leading specials] prompt separator (step separator)* [trailing specials]`, with each step's scored
    position at the last token of its `step + separator`.

    `last_step_only` keeps the label of the last labelled step alone (outcome supervision on the same data); it
    applies before truncation, so an example whose last labelled step does not fit is dropped, not relabelled.
    """
    out = TokenizedSteps()
    if not examples:
        return out
    prefix, suffix = special_affixes(tokenizer)
    budget = max_seq_len - len(prefix) - len(suffix)
    prompt_ids = encode_tails(tokenizer, [ex["prompt"] + separator for ex in examples], max_seq_len)
    flat = [step + separator for ex in examples for step in ex["steps"]]
    flat_ids = iter(encode_bounded(tokenizer, flat, max_seq_len))
    names: dict[str, int] = {}
    for example, prompt in zip(examples, prompt_ids, strict=True):
        steps = [next(flat_ids) for _ in example["steps"]]
        labels = _last_label_only(example["labels"]) if last_step_only else example["labels"]
        ends = np.cumsum([len(step) for step in steps])
        kept = int(np.searchsorted(ends, budget, side="right"))  # whole steps that fit with an empty prompt
        if not any(label is not None for label in labels[:kept]):
            out.too_long += 1
            continue
        room = budget - int(ends[kept - 1])
        fitted = prompt[len(prompt) - room:] if len(prompt) > room else prompt
        out.truncated += kept < len(steps) or len(fitted) < len(prompt)
        start = len(prefix) + len(fitted)
        out.sequences.append(np.asarray(prefix + fitted + [i for step in steps[:kept] for i in step] + suffix,
                                        dtype=np.int32))
        out.positions.append((start + ends[:kept] - 1).astype(np.int32))
        out.labels.append(np.array([UNLABELLED if label is None else label for label in labels[:kept]],
                                   dtype=np.float32))
        out.sources.append(names.setdefault(example["source"], len(names)))
    out.source_names = list(names)
    return out


def save_steps(tokenized: TokenizedSteps, path: str) -> None:
    """Write as `.npz` of flat arrays (no pickles), atomically."""
    sequences, sequence_offsets = pack(tokenized.sequences, np.int32)
    positions, step_offsets = pack(tokenized.positions, np.int32)
    labels, _ = pack(tokenized.labels, np.float32)
    with atomic_write(path, "wb") as handle:
        np.savez(handle, sequences=sequences, sequence_offsets=sequence_offsets, positions=positions, labels=labels,
                 step_offsets=step_offsets, sources=np.asarray(tokenized.sources, dtype=np.int64),
                 source_names=np.asarray(tokenized.source_names, dtype=np.str_),
                 stats=np.array([tokenized.truncated, tokenized.too_long], dtype=np.int64))


def load_steps(path: str) -> TokenizedSteps:
    with np.load(path, allow_pickle=False) as saved:
        truncated, too_long = saved["stats"].tolist()
        return TokenizedSteps(sequences=unpack(saved["sequences"], saved["sequence_offsets"]),
                              positions=unpack(saved["positions"], saved["step_offsets"]),
                              labels=unpack(saved["labels"], saved["step_offsets"]),
                              sources=saved["sources"].tolist(), source_names=saved["source_names"].tolist(),
                              truncated=truncated, too_long=too_long)


class StepDataset(Dataset):
    """One item per example: its token ids, and the scored position and label of each of its steps."""

    def __init__(self, tokenized: TokenizedSteps):
        self.data = tokenized

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self, share_prompt: bool = False) -> np.ndarray:
        """Tokens per solution (one row each: there is no second response to share the prompt with)."""
        return np.array([len(sequence) for sequence in self.data.sequences])

    def row_shapes(self, share_prompt: bool = False) -> RowShapes:
        """One row per solution."""
        return RowShapes(np.ones(len(self), dtype=np.int64), self.lengths())

    def tokens(self, share_prompt: bool = False) -> np.ndarray:
        return self.lengths()

    def loss_units(self) -> np.ndarray:
        """What the loss averages over, per solution: its labelled steps."""
        return np.array([np.count_nonzero(labels != UNLABELLED) for labels in self.data.labels])

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.data.sequences[index], "positions": self.data.positions[index],
                "labels": self.data.labels[index], "source": self.data.sources[index], "index": index}


class StepCollator:
    """Right-padded rows (or with an `arrangement`, packed documents: `utils/data/packing.py`), and the
    steps of all rows flattened in order, as `Steps` targets: whose step each is, where it ends in its
    solution, and where that token lies in the flattened batch.

    Unlabelled steps have `step_mask` False and label 0.0, so the labels are valid BCE targets everywhere.
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int = 8, arrangement: str | None = None):
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0  # masked out either way
        self.multiple = pad_to_multiple_of
        self.arrangement = arrangement

    def __call__(self, items: list[dict]) -> Batch:
        sequences = [item["input_ids"] for item in items]
        if self.arrangement:
            inputs, layout, starts = pack_documents([plain_document(ids) for ids in sequences], self.pad_token_id,
                                                    self.arrangement, self.multiple)
        else:
            inputs, layout = ModelInputs(*pad_right(sequences, self.pad_token_id, self.multiple)), Layout()
            starts = [i * inputs.input_ids.shape[1] for i in range(len(items))]
        positions = [item["positions"].astype(np.int64) for item in items]
        index = np.concatenate([start + pos for start, pos in zip(starts, positions, strict=True)])
        labels = torch.from_numpy(np.concatenate([item["labels"] for item in items]).astype(np.float32))
        mask = labels != UNLABELLED
        targets = Steps(rows=torch.cat([torch.full((len(item["positions"]),), i, dtype=torch.long)
                                        for i, item in enumerate(items)]),
                        positions=torch.from_numpy(np.concatenate(positions)), index=torch.from_numpy(index),
                        labels=torch.where(mask, labels, 0.0), mask=mask)
        return Batch(inputs, targets, layout, **bookkeeping(items))

