"""Process rewards: solutions split into steps, each labelled good or bad, and a logit per step read at
the step's last token (its probability of being correct: the sigmoid). The loss is binary
cross-entropy over the labelled steps.

Held-out table: one row per labelled step, (logit, solution, label, step number).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from rlhf_reward.utils.data.batch import Batch
from rlhf_reward.utils.data.build import StepOptions, create_step_datasets
from rlhf_reward.utils.data.steps import StepCollator
from rlhf_reward.utils.errors import UserError

from step2_reward_model.losses import step_loss
from step2_reward_model.model import ENCODERS, RewardModel, RowValues
from step2_reward_model.objectives.base import DataRequest, Datasets, Loss, Report
from step2_reward_model.objectives.preference import fp32_loss
from step2_reward_model.report import reward_statistics

LOGIT, SOLUTION, LABEL, STEP = range(4)


@dataclass(frozen=True)
class Process:
    separator: str = "\n\n"
    neutral: str = "positive"
    last_step_only: bool = False
    fp32_loss: bool = False

    name = "process"
    unit = "solutions"
    columns = 4
    length_columns = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Process:
        return cls(separator=args.step_separator, neutral=args.prm_neutral,
                   last_step_only=args.train_on_last_step_only, fp32_loss=fp32_loss(args))

    @classmethod
    def from_manifest(cls, manifest: dict) -> Process:
        return cls(separator=manifest.get("step_separator", "\n\n"), neutral=manifest.get("prm_neutral", "positive"),
                   last_step_only=manifest.get("train_on_last_step_only", False))

    def check_backbone(self, config) -> None:
        if config.model_type in ENCODERS:
            raise UserError(f"--objective process (--process_reward) scores each step where it ends, but model type "
                            f"{config.model_type} is an encoder, whose every token sees the whole text (later steps "
                            "included): start from a causal LM")

    def datasets(self, request: DataRequest, tokenizer, end_text: str) -> Datasets:
        options = StepOptions(self.separator, self.neutral, self.last_step_only)
        train, held_out = create_step_datasets(request.source, tokenizer, request.max_seq_len, options,
                                               local_rank=request.local_rank)
        return Datasets(train, held_out, held_out.data.source_names, objective=self)

    def collator(self, pad_token_id: int | None, pad_multiple: int, arrangement: str | None, share_prompt: bool,
                 chunk_tokens: int | None) -> StepCollator:
        return StepCollator(pad_token_id, pad_multiple, arrangement)

    def shares_prompts(self) -> bool:
        return False

    def logits(self, model: RewardModel, rows: RowValues, batch: Batch) -> torch.Tensor:
        """Each step's logit: the value at its last token, in the flattened rows."""
        head = rows.head.float() if self.fp32_loss else rows.head
        return model.combine(head).flatten()[batch.targets.index]

    def loss(self, model: RewardModel, rows: RowValues, batch: Batch) -> Loss:
        """The mean over labelled steps (or, with a loss denominator, their sum over it)."""
        steps = batch.targets
        logits = self.logits(model, rows, batch)
        loss = step_loss(logits, steps.labels, steps.mask)
        if batch.loss_denominator is not None:
            loss = loss * steps.mask.sum() / batch.loss_denominator
        return Loss(loss, logits)

    def table_rows(self, model: RewardModel, rows: RowValues, batch: Batch) -> torch.Tensor:
        steps = batch.targets
        logits = self.logits(model, rows, batch)
        table = torch.stack([logits.double(), steps.rows.double(), steps.labels.double(),
                             torch.arange(len(logits), device=logits.device).double()], 1)
        return table[steps.mask]

    def summarize(self, table: np.ndarray, source_names: list[str]) -> dict:
        """Step accuracy (a step is predicted good when its logit is above 0), solution accuracy (whether
        all its labelled steps are good, predicted right) and first-error accuracy (its first bad
        labelled step, or that there is none, predicted right)."""
        counts = step_counts(table)
        steps, solutions = max(counts["steps"], 1), max(counts["solutions"], 1)
        return {"accuracy": counts["steps_correct"] / steps,
                "first_error_accuracy": counts["first_error_correct"] / solutions,
                "solution_accuracy": counts["solutions_correct"] / solutions,
                "steps": float(counts["steps"]), "solutions": float(counts["solutions"])}

    def statistics(self, table: np.ndarray, data: str) -> dict:
        """Step logits: good steps as "chosen", bad ones as "rejected"."""
        good = table[:, LABEL] > 0.5
        return reward_statistics(table[good, LOGIT], table[~good, LOGIT], data, all_rewards=table[:, LOGIT])

    def manifest(self) -> dict:
        return {"objective": self.name, "loss": "step_bce", "process_reward": True, "step_separator": self.separator,
                "prm_neutral": self.neutral, "train_on_last_step_only": self.last_step_only}

    def log_lines(self, label: str, metrics: dict) -> list[str]:
        return [f"{label}: step accuracy {metrics['accuracy']:.4f}, first-error accuracy "
                f"{metrics['first_error_accuracy']:.4f}, solution accuracy {metrics['solution_accuracy']:.4f} "
                f"({metrics['solutions']:.0f} held-out solutions, {metrics['steps']:.0f} labelled steps)"]

    def headline(self, metrics: dict) -> str:
        return f"final held-out accuracy: {metrics['accuracy']:.4f} on {metrics['solutions']:.0f} solutions (step " \
               "accuracy)"

    def report(self, table: np.ndarray, held_out, source_names: list[str]) -> Report:
        summary = self.summarize(table, source_names)
        lines = [f"{key}  {value}" for key, value in summary.items()]
        return Report({"steps": summary}, "== Steps ==\n" + "\n".join(lines))


def step_counts(table: np.ndarray) -> dict[str, int]:
    """Labelled steps and solutions predicted right, from (logit, solution, label, step) rows, in
    O(R log R): a solution's first bad step is the lowest step number among its bad ones."""
    if not len(table):
        return dict.fromkeys(("steps", "steps_correct", "solutions", "solutions_correct", "first_error_correct"), 0)
    predicted_bad, bad = table[:, LOGIT] <= 0, table[:, LABEL] <= 0.5
    _, solution = np.unique(table[:, SOLUTION], return_inverse=True)
    count = solution.max() + 1

    def first(flags: np.ndarray) -> np.ndarray:  # each solution's first flagged step, inf for none
        found = np.full(count, np.inf)
        np.minimum.at(found, solution[flags], table[flags, STEP])
        return found

    def any_of(flags: np.ndarray) -> np.ndarray:
        return np.bincount(solution, flags, count) > 0

    return {"steps": len(table), "steps_correct": int(np.count_nonzero(predicted_bad == bad)),
            "solutions": int(count), "solutions_correct": int(np.count_nonzero(any_of(predicted_bad) == any_of(bad))),
            "first_error_correct": int(np.count_nonzero(first(predicted_bad) == first(bad)))}
