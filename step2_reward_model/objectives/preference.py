"""Preference: pairs and ranked lists of answers to one prompt, the reward of each answer at its last
token. The loss is `--loss`: end_token (Bradley-Terry over every ordered pair, with margins and
reward centering), plackett_luce (the listwise likelihood), or per_token (DeepSpeed-Chat's, pairs only).

With `--length_head` (ODIN, Chen et al. 2024) the value head has two outputs, a quality reward r_Q and a
length reward r_L. The loss above ranks their sum, and two terms of the paper's section 4 are added:
the length loss (r_Q uncorrelated with the answer's length over the step's answers on every rank, r_L
correlated with it) and the orthogonality of the two heads. The reward is r_Q alone, everywhere it
is served (`model.QUALITY_AND_LENGTH`).

Held-out table: one row per answer, (reward, example, rank, source, answer length, length reward: r_L
with a length head, else NaN).
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

from step2_reward_model.losses import (
    across_ranks,
    length_decorrelation_loss,
    orthogonality_loss,
    per_token_loss,
    plackett_luce_loss,
    ranked_pair_loss,
)
from step2_reward_model.metrics import ranking_accuracies, ranking_counts
from step2_reward_model.model import ENCODERS, QUALITY_AND_LENGTH, RewardModel, RowValues
from step2_reward_model.objectives.base import DataRequest, Datasets, Loss, Report
from step2_reward_model.report import (
    correlation_table,
    format_report,
    length_bias,
    pair_report,
    reward_statistics,
    with_length,
)

SCORE, EXAMPLE, RANK, SOURCE, LENGTH, LENGTH_REWARD = range(6)
# The length diagnostics of `report.length_bias` that training logs with every evaluation.
LENGTH_SUMMARY = ("pearson", "spearman", "accuracy_chosen_longer", "accuracy_chosen_shorter", "balanced_accuracy")


@dataclass(frozen=True)
class Preference:
    loss_name: str = "per_token"
    center_coefficient: float = 0.0
    margin_source: str = "column"
    data_weights: tuple[float, ...] | None = None
    max_responses: int = 0
    fp32_loss: bool = False
    length_head: bool = False
    length_coefficient: float = 1.0
    orthogonality_coefficient: float = 1.0

    name = "preference"
    unit = "pairs"
    columns = 6
    length_columns = (SCORE, LENGTH)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Preference:
        return cls(loss_name=args.loss, center_coefficient=args.center_rewards_coefficient,
                   margin_source=args.margin_source,
                   data_weights=tuple(args.data_weights) if args.data_weights else None,
                   max_responses=args.max_responses_per_prompt, fp32_loss=fp32_loss(args),
                   length_head=args.length_head, length_coefficient=args.length_loss_coefficient,
                   orthogonality_coefficient=args.orthogonality_loss_coefficient)

    @classmethod
    def from_manifest(cls, manifest: dict) -> Preference:
        return cls(loss_name=manifest.get("loss", "per_token"),
                   center_coefficient=manifest.get("center_rewards_coefficient", 0.0),
                   length_head=manifest.get("length_head", False))

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
        return Datasets(train, held_out, held_out.data.source_names, objective=self,
                        head=QUALITY_AND_LENGTH if self.length_head else None)

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
        # ODIN ranks r_Q + r_L; the served reward (`combine`) is r_Q alone.
        values = head.sum(-1) if self.length_head else model.combine(head)
        index = model.scored_index(rows.attention_mask)
        scores = values.gather(-1, index[:, None]).squeeze(-1)
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
        if self.length_head:
            loss = loss + self.disentangling_loss(model, head[torch.arange(len(index), device=index.device), index],
                                                  targets.length)
        if batch.loss_denominator is not None:
            loss = loss * prompts / batch.loss_denominator
        return Loss(loss, scores)

    def disentangling_loss(self, model: RewardModel, ends: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ODIN's terms beside the ranking loss: `length_coefficient` x the length loss over the answers of the
        step on every rank (`ends`: each answer's r_Q and r_L), `orthogonality_coefficient` x the heads'
        orthogonality loss."""
        quality, length_reward, lengths = across_ranks(ends[:, 0], ends[:, 1], lengths)
        return (self.length_coefficient * length_decorrelation_loss(quality, length_reward, lengths)
                + self.orthogonality_coefficient * orthogonality_loss(model.head_weight()))

    def table_rows(self, model: RewardModel, rows: RowValues, batch: Batch) -> torch.Tensor:
        ends = model.end_outputs(rows)
        group = batch.targets.group
        length_reward = ends[:, 1] if self.length_head else torch.full_like(ends[:, 0], torch.nan)
        return torch.stack([model.combine(ends).double(), group.double(), batch.targets.rank.double(),
                            batch.source.to(group.device)[group].double(), batch.targets.length.double(),
                            length_reward.double()], 1)

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
        chosen, rejected, _ = best_worst(table, (SCORE, LENGTH))
        bias = length_bias(chosen[:, 0], rejected[:, 0], chosen[:, 1], rejected[:, 1])
        summary.update({f"length/{key}": bias[key] for key in LENGTH_SUMMARY if bias[key] is not None})
        if self.length_head:
            correlation = with_length({"length_head": table[:, LENGTH_REWARD]}, table[:, LENGTH])["length_head"]
            if correlation["pearson"] is not None:
                summary["length/length_head_pearson"] = correlation["pearson"]
        return summary

    def statistics(self, table: np.ndarray, data: str) -> dict:
        """Every answer's reward, each example's best-ranked and worst-ranked answers apart, and the
        margin of each example (mean best minus mean worst reward) for the calibration figures."""
        best, worst = best_worst_rows(table)
        return reward_statistics(table[best, SCORE], table[worst, SCORE], data, all_rewards=table[:, SCORE],
                                 margins=best_worst_margins(table))

    def manifest(self) -> dict:
        fields = {"objective": self.name, "loss": self.loss_name, "center_rewards_coefficient": self.center_coefficient}
        if self.length_head:
            fields.update(length_head=True, length_loss_coefficient=self.length_coefficient,
                          orthogonality_loss_coefficient=self.orthogonality_coefficient)
        return fields

    def log_lines(self, label: str, metrics: dict) -> list[str]:
        lines = [f"{label}: chosen_last_scores (higher is better) : {metrics['chosen']:.4f}, "
                 f"rejected_last_scores (lower is better) : {metrics['rejected']:.4f}, "
                 f"diff : {metrics['difference']:.4f}, acc (higher is better) : {metrics['accuracy']:.4f} "
                 f"({metrics['pairs']:.0f} held-out pairs)"]
        extras = [f"{name} {value:.4f}" for name, value in metrics.items()
                  if name.startswith(("top1", "accuracy/", "benchmark/"))]
        length = [f"{name.removeprefix('length/')} {value:.4f}" for name, value in metrics.items()
                  if name.startswith("length/")]
        return lines + [f"  {head}{', '.join(found)}" for head, found in (("", extras), ("length: ", length)) if found]

    def headline(self, metrics: dict) -> str:
        return f"final held-out accuracy: {metrics['accuracy']:.4f} on {metrics['pairs']:.0f} pairs"

    def report(self, table: np.ndarray, held_out, source_names: list[str]) -> Report:
        """The pair diagnostics (`report.pair_report`) of each example's best against its worst answers,
        and over ranked lists, accuracy on every ordered pair and top-1 accuracy."""
        data: TokenizedExamples = held_out.data
        best_means, worst_means, examples = best_worst(table, (SCORE, LENGTH))
        (chosen, chosen_lengths), (rejected, rejected_lengths) = best_means.T, worst_means.T
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
        if self.length_head:
            report["length_head"] = with_length({"quality (the reward)": table[:, SCORE],
                                                 "length head": table[:, LENGTH_REWARD],
                                                 "sum (trained on)": table[:, SCORE] + table[:, LENGTH_REWARD]},
                                                table[:, LENGTH])
            text += "\n" + correlation_table("Length head (ODIN)", "head", report["length_head"])
        return Report(report, text, (chosen, rejected, chosen_lengths, rejected_lengths))


def fp32_loss(args: argparse.Namespace) -> bool:
    """Whether the loss is computed in float32 whatever the training dtype."""
    return args.compute_fp32_loss or (args.dtype == "bf16" and args.bf16_to_fp32_loss)


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
                      columns: tuple[int, ...] = (SCORE,)) -> tuple[np.ndarray, np.ndarray]:
    """Per example (sorted by index), the means of `columns` over its rows in `members`, `[examples,
    columns]`, and the examples' indices."""
    examples, example = np.unique(table[members, EXAMPLE], return_inverse=True)
    counts = np.bincount(example, minlength=len(examples))
    sums = np.stack([np.bincount(example, table[members, column], len(examples)) for column in columns], -1)
    return sums / counts[:, None], examples.astype(np.int64)


def best_worst(table: np.ndarray, columns: tuple[int, ...] = (SCORE,)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example (sorted by index), the means of `columns` over its best-ranked answers and over its worst
    (the chosen and rejected sides of its pair, however many answers tie), `[examples, columns]` each, and
    the examples' indices."""
    best, worst = best_worst_rows(table)
    chosen, examples = per_example_means(table, best, columns)
    return chosen, per_example_means(table, worst, columns)[0], examples


def best_worst_margins(table: np.ndarray) -> np.ndarray:
    """Per example, the mean reward of its best-ranked answers minus that of its worst: the margin of
    its pair, whatever order the rows come in and however many answers tie."""
    chosen, rejected, _ = best_worst(table)
    return (chosen - rejected)[:, 0]


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
