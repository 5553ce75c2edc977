"""The interface every objective provides (`Objective`), and the types it speaks in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from rlhf_reward.utils.data.batch import Batch
from rlhf_reward.utils.data.build import DataSource
from rlhf_reward.utils.files import REPO_ROOT

from step2_reward_model.model import Attributes, RewardModel, RowValues


@dataclass(frozen=True)
class DataRequest:
    """Which data to read and how: the rows (`DataSource`), the longest sequence, a chat template given by
    flag (which the cache key must know), and the local rank (rank 0 of each node builds the cache)."""

    source: DataSource
    max_seq_len: int
    chat_template: str | None = None
    local_rank: int = 0

    @classmethod
    def from_args(cls, args, max_seq_len: int, log=print, chat_template: str | None = None,
                  local_rank: int = 0) -> DataRequest:
        """From the data flags training, `rw_eval.py` and `export.py` share."""
        source = DataSource(tuple(args.data_path), args.data_split, args.seed, args.data_output_path, REPO_ROOT,
                            bad_rows=args.bad_rows, log=log)
        return cls(source, max_seq_len, chat_template, local_rank)

    def label(self, split: str = "eval") -> str:
        """What `reward_stats.json` says its data was."""
        return f"{'held-out' if split == 'eval' else split} split of {' '.join(self.source.paths)}"


@dataclass
class Datasets:
    """An objective's train and held-out sets, their source names, and what the data settled: the value
    head's attributes, and the objective with its settings complete (a regression's attribute names,
    label scale and reward weights)."""

    train: object
    held_out: object
    source_names: list[str]
    objective: Objective
    head: Attributes | None = None


@dataclass
class Report:
    """`rw_eval.py --data_path`'s report: JSON, text, and the pairs its figures plot (chosen and rejected
    rewards, then their lengths), where the data has pairs."""

    report: dict
    text: str
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


@dataclass
class Loss:
    loss: torch.Tensor
    scores: torch.Tensor  # what the batch's loss was computed from: one per response or step
    attributes: torch.Tensor | None = None  # a multi-attribute head's outputs per response, [responses, attributes]


class Objective(Protocol):
    """What an objective provides."""

    name: str  # its --objective value, recorded in the manifest
    unit: str  # what one held-out example is, for log lines: "pairs", "solutions", "prompts"
    columns: int  # the held-out table's width
    # The table's (reward, answer length) columns, where its rows are answers: what a length calibration
    # (`export.py --length_calibration`) is fitted on and applied to; None where rewards have no answer length.
    length_columns: tuple[int, int] | None

    def check_backbone(self, config) -> None:
        """Refuse a backbone that cannot learn this objective (an encoder for token-level values)."""

    def datasets(self, request: DataRequest, tokenizer, end_text: str) -> Datasets:
        """Read, clean, split, tokenise and cache the data; the phase-2 train and held-out sets."""

    def collator(self, pad_token_id: int | None, pad_multiple: int, arrangement: str | None, share_prompt: bool,
                 chunk_tokens: int | None):
        """The batches this objective's data goes into (`utils/data/collate.py`, `utils/data/steps.py`)."""

    def shares_prompts(self) -> bool:
        """Whether its examples have several answers to one prompt, which prefix sharing computes once."""

    def loss(self, model: RewardModel, rows: RowValues, batch: Batch) -> Loss:
        """The training loss of a batch from the model's values."""

    def table_rows(self, model: RewardModel, rows: RowValues, batch: Batch) -> torch.Tensor:
        """The held-out table's rows of a batch (float64); column 1 is the example's place in the batch."""

    def summarize(self, table: np.ndarray, source_names: list[str]) -> dict:
        """The held-out metrics of a table: what training logs and `rw_eval.py` reports first."""

    def statistics(self, table: np.ndarray, data: str) -> dict:
        """`reward_stats.json`: the reward's distribution over the held-out table, for step 3's normalisation."""

    def manifest(self) -> dict:
        """Fields of the manifest that say how the model was trained, read back by `from_manifest`."""

    def log_lines(self, label: str, metrics: dict) -> list[str]:
        """An evaluation's metrics, as lines for the training log."""

    def headline(self, metrics: dict) -> str:
        """The last line of a training run: its final held-out figure."""

    def report(self, table: np.ndarray, held_out, source_names: list[str]) -> Report:
        """`rw_eval.py --data_path`'s report of a scored held-out table."""
