"""Preference: pairs and ranked lists of answers to one prompt, the reward of each answer at its last
token. The loss is `--loss`: end_token (Bradley-Terry over every ordered pair, with margins and
reward centering), plackett_luce (the listwise likelihood), or per_token (DeepSpeed-Chat's, pairs only).

Held-out table: one row per answer, (reward, example, rank, source).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from rlhf_reward.utils.data.batch import Batch
from rlhf_reward.utils.data.build import DataOptions, create_reward_datasets
from rlhf_reward.utils.data.collate import PairCollator
from rlhf_reward.utils.data.tokenize import TokenizedExamples, has_ranked_lists
from rlhf_reward.utils.errors import UserError

from step2_reward_model.losses import per_token_loss, plackett_luce_loss, ranked_pair_loss
from step2_reward_model.metrics import ranking_accuracies, ranking_counts
from step2_reward_model.model import ENCODERS, RewardModel, RowValues
from step2_reward_model.objectives.base import DataRequest, Datasets, Loss, Report
from step2_reward_model.report import format_report, pair_report, reward_statistics

SCORE, EXAMPLE, RANK, SOURCE = range(4)


@dataclass(frozen=True)
class Preference:
    loss_name: str = "per_token"
    center_coefficient: float = 0.0
    margin_source: str = "column"
    data_weights: tuple[float, ...] | None = None
    max_responses: int = 0
    fp32_loss: bool = False

    name = "preference"
    unit = "pairs"
    columns = 4

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Preference:
        return cls(loss_name=args.loss, center_coefficient=args.center_rewards_coefficient,
                   margin_source=args.margin_source,
                   data_weights=tuple(args.data_weights) if args.data_weights else None,
                   max_responses=args.max_responses_per_prompt, fp32_loss=fp32_loss(args))

    @classmethod
    def from_manifest(cls, manifest: dict) -> Preference:
        return cls(loss_name=manifest.get("loss", "per_token"),
                   center_coefficient=manifest.get("center_rewards_coefficient", 0.0))

    def check_backbone(self, config) -> None:
        if self.loss_name == "per_token" and config.model_type in ENCODERS:
            raise UserError(f"--loss per_token compares the two answers token by token, but model type "
                            f"{config.model_type} is an encoder, whose every token sees the whole text: pass --loss "
                            "end_token (or --loss plackett_luce) to compare the pooled scores")

    def datasets(self, request: DataRequest, tokenizer, end_text: str) -> Datasets:
        options = DataOptions(data_weights=self.data_weights, margin_source=self.margin_source,
                              max_responses=self.max_responses, chat_template=request.chat_template)
        train, held_out = create_reward_datasets(request.source, tokenizer, request.max_seq_len, end_text,
                                                 local_rank=request.local_rank, options=options)
        self.check_data(train.data)
        return Datasets(train, held_out, held_out.data.source_names, objective=self)

    def check_data(self, data: TokenizedExamples) -> None:
        """The per-token loss compares exactly two answers token by token; say so before training."""
        ranked = has_ranked_lists(data)
        margins = any(margin != 0 for margin in data.margins)
        if self.loss_name == "per_token" and (ranked or margins or self.center_coefficient):
            what = "ranked lists (more than two answers, or ties)" if ranked else \
                "margins" if margins else "--center_rewards_coefficient"
            raise UserError(f"--loss per_token compares two answers token by token and cannot use {what}: "
                            "pass --loss end_token (the pairwise / InstructGPT loss) or --loss plackett_luce")
        if self.loss_name == "plackett_luce" and margins:
            raise UserError("--loss plackett_luce has no margin: pass --margin_source none or --loss end_token")

    def collator(self, pad_token_id: int | None, pad_multiple: int, arrangement: str | None, share_prompt: bool,
                 chunk_tokens: int | None) -> PairCollator:
        return PairCollator(pad_token_id, pad_to_multiple_of=pad_multiple, share_prompt=share_prompt,
                            chunk_tokens=chunk_tokens, arrangement=arrangement)

    def shares_prompts(self) -> bool:
        return True

    def loss(self, model: RewardModel, rows: RowValues, batch: Batch) -> Loss:
        """Rows are every example's best answer, then every second answer, and so on (`PairCollator`)."""
        head = rows.head.float() if self.fp32_loss else rows.head
        values = model.combine(head)
        scores = values.gather(-1, model.scored_index(rows.attention_mask)[:, None]).squeeze(-1)
        targets = batch.targets
        prompts = len(targets.margin)
        if self.loss_name == "per_token":
            # Past its end, a row compares with its end score, not with values at padding, which
            # depend on the layout (one row per answer, or packed).
            values = torch.where(rows.attention_mask.bool(), values, scores[:, None])
            mask, ids = rows.attention_mask, rows.input_ids
            loss = per_token_loss(values[:prompts], values[prompts:], ids[:prompts], ids[prompts:], mask[:prompts],
                                  mask[prompts:])
        elif self.loss_name == "plackett_luce":
            loss = plackett_luce_loss(scores, targets.group, targets.rank)
        else:
            loss = ranked_pair_loss(scores, targets.group, targets.rank, targets.margin, self.center_coefficient)
        if batch.loss_denominator is not None:
            loss = loss * prompts / batch.loss_denominator
        return Loss(loss, scores)

    def table_rows(self, model: RewardModel, rows: RowValues, batch: Batch) -> torch.Tensor:
        scores = end_scores(model, rows)
        group = batch.targets.group
        return torch.stack([scores.double(), group.double(), batch.targets.rank.double(),
                            batch.source.to(group.device)[group].double()], 1)

    def summarize(self, table: np.ndarray, source_names: list[str]) -> dict:
        """Accuracy over every ordered pair of answers (ties in reward count half), mean best and worst
        reward, top-1 accuracy where there are lists of three or more, and accuracy per source."""
        counts, accuracies = ranking(table)
        best, worst = best_worst_rows(table)
        answers = np.unique(table[:, EXAMPLE], return_counts=True)[1]  # per example
        summary = {"accuracy": accuracies["pairwise_accuracy"] or 0.0,
                   "chosen": float(table[best, SCORE].mean()) if best.any() else 0.0,
                   "rejected": float(table[worst, SCORE].mean()) if worst.any() else 0.0,
                   "pairs": len(answers), "ordered_pairs": int(counts["pairs"])}
        summary["difference"] = summary["chosen"] - summary["rejected"]
        if accuracies["top1_accuracy"] is not None and (answers > 2).any():
            summary["top1_accuracy"] = accuracies["top1_accuracy"]
        sources = np.unique(table[:, SOURCE])
        if len(sources) > 1:
            for value in sources:
                accuracy = ranking(table[table[:, SOURCE] == value])[1]["pairwise_accuracy"]
                if accuracy is not None:
                    summary[f"accuracy/{source_names[int(value)]}"] = accuracy
        return summary

    def statistics(self, table: np.ndarray, data: str) -> dict:
        """Every answer's reward, each example's best-ranked and worst-ranked answers apart, and the
        margin of each example (mean best minus mean worst reward) for the calibration figures."""
        best, worst = best_worst_rows(table)
        return reward_statistics(table[best, SCORE], table[worst, SCORE], data, all_rewards=table[:, SCORE],
                                 margins=best_worst_margins(table))

    def manifest(self) -> dict:
        return {"objective": self.name, "loss": self.loss_name, "center_rewards_coefficient": self.center_coefficient}

    def log_lines(self, label: str, metrics: dict) -> list[str]:
        lines = [f"{label}: chosen_last_scores (higher is better) : {metrics['chosen']:.4f}, "
                 f"rejected_last_scores (lower is better) : {metrics['rejected']:.4f}, "
                 f"diff : {metrics['difference']:.4f}, acc (higher is better) : {metrics['accuracy']:.4f} "
                 f"({metrics['pairs']:.0f} held-out pairs)"]
        extras = [f"{name} {value:.4f}" for name, value in metrics.items()
                  if name.startswith(("top1", "accuracy/", "benchmark/"))]
        return lines + (["  " + ", ".join(extras)] if extras else [])

    def headline(self, metrics: dict) -> str:
        return f"final held-out accuracy: {metrics['accuracy']:.4f} on {metrics['pairs']:.0f} pairs"

    def report(self, table: np.ndarray, held_out, source_names: list[str]) -> Report:
        """The pair diagnostics (`report.pair_report`) of each example's best against its worst answers,
        and over ranked lists, accuracy on every ordered pair and top-1 accuracy."""
        data: TokenizedExamples = held_out.data
        lengths = answer_lengths(data, table[:, EXAMPLE].astype(np.int64))
        best, worst = best_worst_rows(table)
        chosen, chosen_lengths, examples = per_example_means(table, best, lengths)
        rejected, rejected_lengths, _ = per_example_means(table, worst, lengths)
        prompt_lengths = np.array([len(data.prompts[e]) for e in examples])
        report = pair_report(chosen, rejected, chosen_lengths, rejected_lengths,
                             prompt_lengths + np.maximum(chosen_lengths, rejected_lengths),
                             [source_names[data.sources[e]] for e in examples])
        text = format_report(report)
        if has_ranked_lists(data):
            counts, accuracies = ranking(table)
            report["ranking"] = {"ordered_pairs": int(counts["pairs"]),
                                 "pairwise_accuracy": accuracies["pairwise_accuracy"],
                                 "prompts_with_one_best": int(counts["groups_with_top1"]),
                                 "top1_accuracy": accuracies["top1_accuracy"]}
            text += "\n== Ranked lists ==\n" + "\n".join(f"{key}  {value}" for key, value in report["ranking"].items())
        return Report(report, text, (chosen, rejected, chosen_lengths, rejected_lengths))


def fp32_loss(args: argparse.Namespace) -> bool:
    """Whether the loss is computed in float32 whatever the training dtype."""
    return args.compute_fp32_loss or (args.dtype == "bf16" and args.bf16_to_fp32_loss)


def end_scores(model: RewardModel, rows: RowValues) -> torch.Tensor:
    """Each row's reward: the combined head output at its scored token."""
    return model.combine(model.end_outputs(rows))


def ranking(table: np.ndarray) -> tuple[dict, dict]:
    """`metrics.ranking_counts` over a table's answers, and the accuracies made from them."""
    counts = ranking_counts(table[:, SCORE], table[:, EXAMPLE], table[:, RANK])
    return counts, ranking_accuracies(counts)


def best_worst_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the rows at their example's best rank and at its worst."""
    _, example = np.unique(table[:, EXAMPLE], return_inverse=True)
    count = example.max() + 1 if len(example) else 0
    best, worst = np.full(count, np.inf), np.full(count, -np.inf)
    np.minimum.at(best, example, table[:, RANK])
    np.maximum.at(worst, example, table[:, RANK])
    return table[:, RANK] == best[example], table[:, RANK] == worst[example]


def per_example_means(table: np.ndarray, members: np.ndarray,
                      lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Per example (sorted by index), the mean reward of its rows in `members`, their mean length
    (with `lengths`, per row), and the examples' indices."""
    examples, example = np.unique(table[members, EXAMPLE], return_inverse=True)
    counts = np.bincount(example, minlength=len(examples))
    mean_length = None if lengths is None else np.bincount(example, lengths[members], len(examples)) / counts
    return np.bincount(example, table[members, SCORE], len(examples)) / counts, mean_length, examples.astype(np.int64)


def best_worst_margins(table: np.ndarray) -> np.ndarray:
    """Per example, the mean reward of its best-ranked answers minus that of its worst: the margin of
    its pair, whatever order the rows come in and however many answers tie."""
    best, worst = best_worst_rows(table)
    return per_example_means(table, best)[0] - per_example_means(table, worst)[0]


def answer_lengths(data: TokenizedExamples, example: np.ndarray) -> np.ndarray:
    """The token length of each table row's answer, for rows in the order they were scored."""
    return np.array([len(data.responses[e][k]) for e, k in zip(example, answer_positions(example), strict=True)],
                    dtype=np.float64)


def answer_positions(example: np.ndarray) -> np.ndarray:
    """Each row's position among its example's answers, for rows in the order they were scored: the
    collator puts every example's answer k in block k, so an example's rows come in answer order."""
    order = np.argsort(example, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(example[order])) + 1]
    sizes = np.diff(np.r_[starts, len(order)])
    positions = np.empty(len(example), dtype=np.int64)
    positions[order] = np.arange(len(order)) - np.repeat(starts, sizes)
    return positions
