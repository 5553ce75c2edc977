"""Regression on rated attributes (helpfulness, correctness, ...): a value-head output per attribute,
the mean squared error over the rated ones, and a reward that is their weighted sum (optionally with
a Bradley-Terry term on that reward: `--pair_loss_coefficient`). Labels are learnt on the
`--attribute_scale` the training labels settle.

Held-out table: one row per response, (reward, prompt, combined label, predictions..., labels...),
in the model's (scaled) units.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import numpy as np
import torch
from rlhf_reward.utils.data.attributes import AttributeDataset, AttributeScale, parse_weights
from rlhf_reward.utils.data.batch import Batch
from rlhf_reward.utils.data.build import AttributeOptions, create_attribute_datasets

from step2_reward_model.losses import attribute_loss, combined_labels, ranked_pair_loss
from step2_reward_model.model import Attributes, RewardModel, RowValues
from step2_reward_model.objectives.base import DataRequest, Datasets, Loss, Report
from step2_reward_model.objectives.preference import Preference, answer_lengths, fp32_loss
from step2_reward_model.report import (
    attribute_report,
    best_worst,
    format_attribute_report,
    format_report,
    pair_report,
    rated_statistics,
)

REWARD, PROMPT, TARGET = range(3)


@dataclass(frozen=True)
class Regression:
    requested: tuple[str, ...] | None = None  # --attributes; None: every attribute the data rates
    weight_specs: tuple[str, ...] | None = None  # --attribute_weights
    scale_kind: str = "none"
    pair_loss_coefficient: float = 0.0
    fp32_loss: bool = False
    # Settled by the data (`datasets`) or read from a saved model's manifest:
    head: Attributes | None = None
    scale: AttributeScale | None = None

    name = "regression"
    unit = "prompts"
    length_columns = None

    @property
    def columns(self) -> int:
        return 3 + 2 * len(self.head.names)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Regression:
        return cls(requested=tuple(args.attributes) if args.attributes else None,
                   weight_specs=tuple(args.attribute_weights) if args.attribute_weights else None,
                   scale_kind=args.attribute_scale, pair_loss_coefficient=args.pair_loss_coefficient,
                   fp32_loss=fp32_loss(args))

    @classmethod
    def from_manifest(cls, manifest: dict) -> Regression:
        attributes = manifest["attributes"]
        names = tuple(attributes["names"])
        return cls(requested=names, scale_kind=attributes.get("scale", {}).get("kind", "none"),
                   pair_loss_coefficient=manifest.get("pair_loss_coefficient", 0.0),
                   head=Attributes.from_manifest(attributes), scale=AttributeScale.from_manifest(manifest))

    def check_backbone(self, config) -> None:
        """Any backbone: attributes are read at the one scored token, as a reward is."""

    def datasets(self, request: DataRequest, tokenizer, end_text: str) -> Datasets:
        """Rated responses, one example per prompt. Settles the attributes trained (the data's, or
        --attributes), their label scale (from the training labels, or a saved model's) and the
        reward's weights."""
        options = AttributeOptions(names=self.requested, chat_template=request.chat_template)
        train, held_out = create_attribute_datasets(request.source, tokenizer, request.max_seq_len, end_text, options,
                                                     local_rank=request.local_rank)
        names = tuple(train.attribute_names)
        scale = self.scale or AttributeScale.of(self.scale_kind, train.labels, len(names))
        head = self.head or Attributes(names, tuple(parse_weights(list(self.weight_specs or ()), list(names))))
        settled = replace(self, head=head, scale=scale)
        return Datasets(AttributeDataset(train, scale), AttributeDataset(held_out, scale), held_out.source_names,
                        head=head, objective=settled)

    # Rated responses batch as a prompt's ranked answers do, with their labels (`PairCollator`).
    collator = Preference.collator
    shares_prompts = Preference.shares_prompts

    def predictions(self, model: RewardModel, rows: RowValues) -> torch.Tensor:
        predicted = model.end_outputs(rows)
        return predicted.float() if self.fp32_loss else predicted

    def loss(self, model: RewardModel, rows: RowValues, batch: Batch) -> Loss:
        """The mean squared error over rated cells, plus the pair loss of the reward on every two
        responses to a prompt whose combined labels differ (the better one ranks lower; an unknown
        combined label, NaN, is in no pair)."""
        labels = batch.targets.labels
        predicted = self.predictions(model, rows)
        scores = model.combine(predicted)
        loss = attribute_loss(predicted, labels)
        if self.pair_loss_coefficient:
            rank = -combined_labels(labels, model.attribute_weights)
            loss = loss + self.pair_loss_coefficient * ranked_pair_loss(scores, batch.targets.group, rank)
        if batch.loss_denominator is not None:
            loss = loss * (~labels.isnan()).sum() / batch.loss_denominator
        return Loss(loss, scores, predicted)

    def table_rows(self, model: RewardModel, rows: RowValues, batch: Batch) -> torch.Tensor:
        predicted = self.predictions(model, rows).double()
        labels, group = batch.targets.labels.double(), batch.targets.group
        return torch.cat([model.combine(predicted)[:, None], group.double()[:, None],
                          combined_labels(labels, model.attribute_weights)[:, None], predicted, labels], 1)

    def split(self, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The predictions and labels of a table, [responses, attributes] each."""
        count = len(self.head.names)
        return table[:, 3:3 + count], table[:, 3 + count:3 + 2 * count]

    def summarize(self, table: np.ndarray, source_names: list[str]) -> dict:
        """MSE, Pearson and Spearman per attribute and their means, and the reward's pairwise accuracy on
        every two responses to one prompt whose combined labels differ (`report.attribute_report`)."""
        predicted, labels = self.split(table)
        report = attribute_report(predicted, labels, self.head.names, table[:, REWARD], table[:, PROMPT],
                                  table[:, TARGET])
        summary = {key: report[key] for key in ("responses", "mse", "pearson", "spearman", "comparisons",
                                                "pairwise_accuracy")}
        for name, row in report["attributes"].items():
            summary.update({f"{metric}/{name}": row[metric] for metric in ("mse", "pearson", "spearman")})
        return {key: value for key, value in summary.items() if value is not None}

    def statistics(self, table: np.ndarray, data: str) -> dict:
        """Every response's reward, and each prompt's best and worst rated answer as its pair."""
        return rated_statistics(table[:, REWARD], table[:, PROMPT], table[:, TARGET], data)

    def manifest(self) -> dict:
        scale = self.scale
        return {"objective": self.name, "loss": "attribute_mse", "pair_loss_coefficient": self.pair_loss_coefficient,
                "attributes": {"scale": {"kind": self.scale_kind, "low": scale.low, "high": scale.high}}}

    def log_lines(self, label: str, metrics: dict) -> list[str]:
        pairwise = f", pairwise accuracy {metrics['pairwise_accuracy']:.4f} on {metrics['comparisons']:.0f} " \
                   "comparisons" if "pairwise_accuracy" in metrics else ""
        return [f"{label}: mean Spearman {metrics.get('spearman', float('nan')):.4f}, mean MSE "
                f"{metrics.get('mse', float('nan')):.4f}{pairwise} ({metrics['responses']:.0f} held-out responses)",
                "  " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()
                                 if name.startswith(("spearman/", "mse/")))]

    def headline(self, metrics: dict) -> str:
        return f"final held-out mean Spearman: {metrics.get('spearman', float('nan')):.4f} over " \
               f"{len(self.head.names)} attribute(s) on {metrics['responses']:.0f} responses"

    def report(self, table: np.ndarray, held_out, source_names: list[str]) -> Report:
        """Per attribute MSE, Pearson and Spearman in the data's units (and how much of each is length),
        then the reward's pair diagnostics on each prompt's best and worst rated answer, where a prompt
        has two answers with different combined labels."""
        data = held_out.data
        prompt = table[:, PROMPT].astype(np.int64)
        lengths = answer_lengths(data, prompt)
        predicted, labels = (self.scale.invert(values) for values in self.split(table))
        rewards = table[:, REWARD]
        report = {"attributes": attribute_report(predicted, labels, self.head.names, rewards, prompt,
                                                 table[:, TARGET], lengths)}
        text = format_attribute_report(report["attributes"])
        best, worst = best_worst(prompt, table[:, TARGET])
        if not len(best):
            return Report(report, text + "\nno prompt has two answers with different combined labels: no pairwise "
                          "diagnostics")
        prompt_lengths = np.array([len(data.prompts[p]) for p in prompt[best]])
        report.update(pair_report(rewards[best], rewards[worst], lengths[best], lengths[worst],
                                  prompt_lengths + np.maximum(lengths[best], lengths[worst]),
                                  [source_names[data.sources[p]] for p in prompt[best]]))
        text += f"\n== Best vs worst rated answer of each prompt: {len(best)} pairs ==\n" + format_report(report)
        return Report(report, text, (rewards[best], rewards[worst], lengths[best], lengths[worst]))
