"""Responses rated on several attributes (HelpSteer, UltraFeedback), for `--objective regression`.

A row is one of three layouts, told apart by its keys:

    {"prompt", "response", "attributes": {name: value, ...}}              generic
    {"prompt", "response", "helpfulness", "correctness", ...}              HelpSteer / HelpSteer2 columns
    {"instruction", "completions": [{"response", "annotations": {...}}]}   UltraFeedback's fine-grained ratings

Prompts and responses are text or chat messages. A value is a number (or numeric text, as CSV files
hold it); null, NaN, "" and "N/A" mean the attribute was not rated, which masks it in the loss: it
is never read as 0. A row whose fields do not match follows `--bad_rows` like any malformed row.

Responses to the same prompt (HelpSteer2 rates two per prompt, UltraFeedback four) are grouped into
one example, best-first order not implied: the collator then computes the prompt once, and the
optional pair loss compares the responses whose combined labels differ. The attribute names come
from the data, in the order their fields first appear, unless `--attributes` picks them.

The combined reward is a weighted sum of the attributes (`parse_weights`), which is what step 3
reads from the single collapsed value head.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rlhf_reward.utils.data.collate import PairDataset
from rlhf_reward.utils.data.examples import Outcome, is_blank, judge_rows
from rlhf_reward.utils.data.fields import Malformed, as_content, as_object, describe, required
from rlhf_reward.utils.errors import UserError

HELPSTEER = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
# Named weightings for --attribute_weights. helpsteer2: the combination NVIDIA recommends for its
# HelpSteer2-trained Nemotron-4-340B-Reward when one scalar reward is wanted (its model card).
RECIPES = {"helpsteer2": {"helpfulness": 0.3, "correctness": 0.74, "coherence": 0.46, "complexity": 0.47,
                          "verbosity": -0.33}}
MISSING_TEXT = ("", "n/a", "na", "null", "none", "nan")
NO_LABEL = "no labelled attribute"
SCALES = ("none", "minmax")


def _value(value: Any, name: str) -> float | None:
    """A rating as a float, or None when it is missing; Malformed for anything else."""
    if isinstance(value, dict) and "Rating" in value:  # UltraFeedback: {"Rating": "4", "Rationale": ...}
        value = value["Rating"]
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in MISSING_TEXT:
            return None
        try:
            value = float(value)
        except ValueError:
            raise Malformed(f"{name} is not a number", f" (found text {value[:20]!r})") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Malformed(f"{name} is not a number", f" (found {describe(value)})")
    value = float(value)
    if math.isinf(value):
        raise Malformed(f"{name} is not a finite number")
    return None if math.isnan(value) else value


def _ratings(values: Any, name: str) -> dict[str, float | None]:
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise Malformed(f"{name} is not an object of attribute ratings", f" (found {describe(values)})")
    return {key: _value(value, f"attribute '{key}' of {name}") for key, value in values.items()}


def _responses(row: dict) -> tuple[Any, list[tuple[Any, dict[str, float | None]]]]:
    """(prompt, [(response, ratings), ...]) of a row in any of the three layouts."""
    if "completions" in row and "instruction" in row:
        prompt = as_content(row["instruction"], "field 'instruction'")
        completions = row["completions"]
        if not isinstance(completions, list):
            raise Malformed("field 'completions' is not a list", f" (found {describe(completions)})")
        rated = []
        for index, completion in enumerate(completions):
            where = f"completion {index}"
            if not isinstance(completion, dict):
                raise Malformed(f"{where} is not an object", f" (found {describe(completion)})")
            response = as_content(required(completion, "response"), f"field 'response' of {where}")
            rated.append((response, _ratings(required(completion, "annotations"), f"the annotations of {where}")))
        return prompt, rated
    prompt = as_content(required(row, "prompt"), "field 'prompt'")
    response = as_content(required(row, "response"), "field 'response'")
    if "attributes" in row:
        return prompt, [(response, _ratings(row["attributes"], "field 'attributes'"))]
    columns = [key for key in HELPSTEER if key in row]
    if not columns:
        raise Malformed("missing field 'attributes'", f" (or HelpSteer columns: {', '.join(HELPSTEER)})")
    return prompt, [(response, {key: _value(row[key], f"field '{key}'") for key in columns})]


def _rated_outcome(row: Any, source: str) -> Outcome:
    """({prompt, responses, ratings, source}, None), or (None, why a well-formed row cannot be used)."""
    prompt, rated = _responses(as_object(row))
    if is_blank(prompt):
        return None, "empty prompt"
    if not rated:
        return None, "no responses"
    if any(is_blank(response) for response, _ in rated):
        return None, "empty response"
    if all(value is None for _, ratings in rated for value in ratings.values()):
        return None, NO_LABEL
    return {"prompt": prompt, "responses": [response for response, _ in rated],
            "ratings": [ratings for _, ratings in rated], "source": source}, None


def judge_rated_rows(rows: list[tuple[str, Any]], source: str, bad_rows: str = "error") -> list[Outcome]:
    """Each attribute-rated row's outcome (see `utils.data.examples.judge_rows`)."""
    return judge_rows(rows, lambda _, row: _rated_outcome(row, source), bad_rows)


def attribute_names(examples: list[dict], chosen: Sequence[str] | None) -> list[str]:
    """The attributes to train: `chosen` (--attributes) in its order, each of which some row must
    rate, or every attribute the rows rate, in the order their fields first appear."""
    seen: dict[str, bool] = {}
    for example in examples:
        for ratings in example["ratings"]:
            for name, value in ratings.items():
                seen[name] = seen.get(name, False) or value is not None
    found = [name for name, rated in seen.items() if rated]
    if not chosen:
        if not found:
            raise UserError("no attribute has a rating in the data")
        return found
    unknown = [name for name in chosen if name not in found]
    if unknown:
        raise UserError(f"--attributes {' '.join(unknown)}: no row rates it (the data rates: "
                        f"{', '.join(found) or 'nothing'})")
    if len(set(chosen)) < len(chosen):
        raise UserError(f"--attributes names an attribute twice: {' '.join(chosen)}")
    return list(chosen)


def group_by_prompt(examples: list[dict], names: list[str]) -> tuple[list[dict], Counter]:
    """Examples of one prompt each, with all the rows' responses to it and their label vectors (NaN:
    not rated); a response rating none of `names` is dropped and counted."""
    grouped: dict[Any, dict] = {}
    dropped: Counter = Counter()
    for example in examples:
        prompt = example["prompt"]
        key = (example["source"], prompt if isinstance(prompt, str) else repr(prompt))
        for response, ratings in zip(example["responses"], example["ratings"], strict=True):
            labels = [np.nan if ratings.get(name) is None else ratings[name] for name in names]
            if all(math.isnan(value) for value in labels):
                dropped[NO_LABEL] += 1
                continue
            entry = grouped.setdefault(key, {"prompt": prompt, "responses": [], "labels": [],
                                             "source": example["source"]})
            entry["responses"].append(response)
            entry["labels"].append(labels)
    return [{**entry, "ranks": [0] * len(entry["responses"])} for entry in grouped.values()], dropped  # unordered


def parse_weights(specs: list[str] | None, names: list[str]) -> list[float]:
    """The weight of each attribute in the combined reward: equal weights summing to 1 by default,
    a recipe by name (`RECIPES`), or `name=w` for some attributes (the others get 0)."""
    if not specs:
        return [1.0 / len(names)] * len(names)
    if len(specs) == 1 and specs[0] in RECIPES:
        given = RECIPES[specs[0]]
        absent = [name for name in given if name not in names]
        if absent:
            raise UserError(f"--attribute_weights {specs[0]}: the model has no attribute {', '.join(absent)} "
                            f"(it has: {', '.join(names)})")
    else:
        given = {}
        for spec in specs:
            name, equals, value = spec.partition("=")
            try:
                weight = float(value)
            except ValueError:
                weight = math.nan
            if not equals or not math.isfinite(weight):
                raise UserError(f"--attribute_weights {spec}: expected name=number, or one of the recipes "
                                f"{', '.join(RECIPES)}")
            if name not in names:
                raise UserError(f"--attribute_weights {spec}: no attribute {name!r} (the model has: "
                                f"{', '.join(names)})")
            given[name] = weight
    weights = [float(given.get(name, 0.0)) for name in names]
    if not any(weights):
        raise UserError("--attribute_weights: every weight is 0, so the combined reward would be 0")
    return weights


@dataclass(frozen=True)
class AttributeScale:
    """Labels as the model learns them: (label - low) / (high - low) per attribute, so that attributes
    rated on different ranges weigh alike in the loss; low 0 and high 1 leave them as they are."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    @classmethod
    def of(cls, kind: str, labels: list[np.ndarray], count: int) -> AttributeScale:
        """The identity ("none"), or each attribute's training range mapped onto [0, 1] ("minmax")."""
        if kind == "none":
            return cls((0.0,) * count, (1.0,) * count)
        stacked = np.concatenate(labels) if labels else np.zeros((0, count))
        low, high = np.nanmin(stacked, 0), np.nanmax(stacked, 0)
        high = np.where(high > low, high, low + 1.0)  # one value only: shift it to 0, keep the unit
        return cls(tuple(low.tolist()), tuple(high.tolist()))

    @classmethod
    def from_manifest(cls, manifest: dict) -> AttributeScale | None:
        """The scale a saved model's manifest records (None: a model without attributes)."""
        scale = manifest.get("attributes", {}).get("scale")
        return cls(tuple(scale["low"]), tuple(scale["high"])) if scale else None

    def apply(self, labels: np.ndarray) -> np.ndarray:
        low, high = np.asarray(self.low), np.asarray(self.high)
        return ((labels - low) / (high - low)).astype(np.float32)

    def invert(self, values: np.ndarray) -> np.ndarray:
        """Model outputs back in the data's units."""
        low, high = np.asarray(self.low), np.asarray(self.high)
        return values * (high - low) + low


class AttributeDataset(PairDataset):
    """A prompt's rated responses, as `PairDataset` items with `labels` [responses, attributes]
    (scaled, NaN where not rated)."""

    def __init__(self, tokenized, scale: AttributeScale):
        super().__init__(tokenized)
        self.scaled = [scale.apply(labels) for labels in tokenized.labels]

    def loss_units(self) -> np.ndarray:
        """What the loss averages over, per example: its rated (response, attribute) cells."""
        return np.array([np.count_nonzero(~np.isnan(labels)) for labels in self.data.labels])

    def __getitem__(self, index: int) -> dict:
        return {**super().__getitem__(index), "labels": self.scaled[index]}
