"""Held-out data -> the objective's table -> metrics and `reward_stats.json`: the one path shared by
training's evaluations, `rw_eval.py --data_path` and `export.py --data_path`.

Batches come from the objective's own collator, and `Objective.table_rows` turns the model's values
into float64 rows whose column 1 is the example's index in its data set. In training every rank
scores its shard (`EvalShard` pads the shards to equal length with repeats flagged not real), the
rows are gathered on every rank and the repeats dropped, so the metrics are computed once from the
whole table: accuracies are exact, not averages of per-rank averages. The table holds one row per
scored answer or step, so what is computed from it (`Objective.summarize`, `Objective.statistics`)
grows as R log R at most. A length-calibrated model's rewards are calibrated in the table
(`calibration.py`), as `Scorer` calibrates every reward it gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from rlhf_reward.utils.data.batch import Batch
from rlhf_reward.utils.data.collate import chunk_tokens_for
from rlhf_reward.utils.data.packing import pad_multiple
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.runtime import gather_uneven
from torch.utils.data import DataLoader, Subset

from step2_reward_model.calibration import LengthCalibration
from step2_reward_model.model import RewardModel, RowValues
from step2_reward_model.objectives.base import DataRequest, Objective
from step2_reward_model.report import calibration_effect
from step2_reward_model.scoring import Scorer


def batch_rows(forward: Callable[[Batch], RowValues], objective: Objective, model: RewardModel, loader,
               device: torch.device, limit: int | None = None, progress: bool = False) -> torch.Tensor:
    """This process's table rows, each ending with a column that says whether its example is real;
    at most `limit` batches. The rows stay on the device until the end: no copy to the host per batch."""
    from tqdm import tqdm

    parts = []
    for step, batch in enumerate(tqdm(loader, desc="scoring", unit="batch", disable=not progress)):
        if step == limit:
            break
        batch = batch.to(device)
        table = objective.table_rows(model, forward(batch), batch).detach()
        example = table[:, 1].long()
        real = batch.real.to(device)[example] if batch.real is not None else torch.ones_like(example)
        table[:, 1] = batch.index.to(device)[example].double()
        parts.append(torch.cat([table, real.double()[:, None]], 1))
    if not parts:
        return torch.zeros((0, objective.columns + 1), dtype=torch.float64, device=device)
    return torch.cat(parts)


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (their counts may differ: ranked lists vary in length), on every rank."""
    return torch.cat(gather_uneven(local)).cpu()


def held_out_table(local: torch.Tensor) -> np.ndarray:
    """The whole table from every rank's rows, repeats dropped."""
    table = gather_rows(local)
    return table[table[:, -1] > 0, :-1].numpy()


@dataclass
class HeldOut:
    """A scored split of a data set: its table, the data set and the objective with the data's settings;
    for a length-calibrated model, the rewards before calibration too."""

    table: np.ndarray
    dataset: object
    source_names: list[str]
    objective: Objective
    uncalibrated: np.ndarray | None = None

    def calibrate(self, calibration: LengthCalibration) -> None:
        """Calibrate the table's rewards in place, keeping those before in `uncalibrated`."""
        reward, length = length_columns(self.objective)
        self.uncalibrated = self.table[:, reward].copy()
        self.table[:, reward] = calibration.apply(self.uncalibrated, self.table[:, length])

    def calibration_effect(self) -> dict:
        """The rewards' correlation with answer length before and after `calibrate`."""
        reward, length = length_columns(self.objective)
        return calibration_effect(self.uncalibrated, self.table[:, reward], self.table[:, length])


def length_columns(objective: Objective) -> tuple[int, int]:
    """The table's (reward, answer length) columns; a UserError for an objective whose rewards have none."""
    if objective.length_columns is None:
        raise UserError(f"length calibration is for preference models (pairs or ranked answers), not "
                        f"--objective {objective.name}")
    return objective.length_columns


def score_split(scorer: Scorer, objective: Objective, request: DataRequest, split: str) -> HeldOut:
    """Score a split of training's data (same sources, cleaning, phase-2 split and truncation) with a
    saved model, in batches of the objective's layout, longest first, one row per answer."""
    model, tokenizer, device = scorer.model, scorer.tokenizer, scorer.device
    data = objective.datasets(request, tokenizer, scorer.end_of_conversation_token)
    dataset = data.held_out if split == "eval" else data.train
    if not len(dataset):
        raise UserError(f"--data_path {' '.join(request.source.paths)}: nothing to score in the {split} split")
    request.source.log(f"data: {len(dataset)} {data.objective.unit} to score in the {split} split")
    attention = getattr(model.config, "_attn_implementation", None)
    # Padding is masked, so its id only has to be in the embedding, which OUTPUT's own pad (added for the
    # frameworks that need one) may not be.
    collator = data.objective.collator(0, pad_multiple(attention), None, False,
                                       chunk_tokens_for(device.type))
    order = np.argsort(-dataset.lengths(False), kind="stable")
    loader = DataLoader(Subset(dataset, order), batch_size=scorer.batch_size, collate_fn=collator)
    with torch.inference_mode():
        local = batch_rows(lambda batch: model(batch.inputs, batch.layout), data.objective, model, loader, device,
                           progress=True)
    held_out = HeldOut(held_out_table(local), dataset, data.source_names, data.objective)
    if scorer.length_calibration is not None:
        held_out.calibrate(scorer.length_calibration)
    return held_out
