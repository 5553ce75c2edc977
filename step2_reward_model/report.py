"""Metrics of a reward model on held-out preference pairs (or rated answers, `attribute_report`),
beyond the single accuracy number.

Pairwise accuracy alone hides what matters downstream: whether the margins are calibrated
probabilities, where the model is right (by source, by margin, by length), whether it simply
rewards longer answers, and the reward distribution PPO will normalise with. Everything here is a
pure numpy function of per-pair arrays, so training, `rw_eval.py` and the tests share one
definition, and every result is plain JSON (python numbers, None where a value is undefined).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

STAT_KEYS = ("count", "mean", "std", "min", "q05", "q25", "median", "q75", "q95", "max")
_QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}


def _vector(values: ArrayLike) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _same_length(*arrays: np.ndarray) -> None:
    if len({len(a) for a in arrays}) > 1:
        raise ValueError(f"per-pair arrays differ in length: {[len(a) for a in arrays]}")


def _number(value: float) -> float | None:
    """A python float, or None for NaN/inf (JSON has neither)."""
    value = float(value)
    return value if np.isfinite(value) else None


def _wins(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """1 where `first` is higher, 0.5 on a tie, 0 otherwise."""
    return (first > second) + 0.5 * (first == second)


def _accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float | None:
    return _number(_wins(chosen, rejected).mean()) if len(chosen) else None


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """exp(log sigmoid(x)): no overflow for large |x|."""
    return np.exp(-np.logaddexp(0.0, -x))


def pair_summary(chosen: ArrayLike, rejected: ArrayLike) -> dict:
    """Pair count, accuracy (ties count half), exact ties, and mean/std (ddof 0) of both rewards and the margin;
    with no pairs, both counts are 0 and the rest None."""
    chosen, rejected = _vector(chosen), _vector(rejected)
    _same_length(chosen, rejected)
    if not len(chosen):
        moments = ("chosen_mean", "chosen_std", "rejected_mean", "rejected_std", "margin_mean", "margin_std")
        return {"pairs": 0, "accuracy": None, "ties": 0, **dict.fromkeys(moments)}
    margin = chosen - rejected
    return {
        "pairs": len(chosen),
        "accuracy": _accuracy(chosen, rejected),
        "ties": int(np.count_nonzero(chosen == rejected)),
        "chosen_mean": _number(chosen.mean()),
        "chosen_std": _number(chosen.std()),
        "rejected_mean": _number(rejected.mean()),
        "rejected_std": _number(rejected.std()),
        "margin_mean": _number(margin.mean()),
        "margin_std": _number(margin.std()),
    }


def reward_stats(rewards: ArrayLike) -> dict:
    """Count, mean, std (ddof 0), min, 5/25/50/75/95% quantiles (linear) and max; None for each but count
    when empty. The key names are read back from checkpoints for PPO's reward normalisation."""
    rewards = _vector(rewards)
    if not len(rewards):
        return {"count": 0, **dict.fromkeys(STAT_KEYS[1:])}
    quantiles = np.quantile(rewards, list(_QUANTILES.values()))
    return {
        "count": len(rewards),
        "mean": _number(rewards.mean()),
        "std": _number(rewards.std()),
        "min": _number(rewards.min()),
        **{key: _number(q) for key, q in zip(_QUANTILES, quantiles, strict=True)},
        "max": _number(rewards.max()),
    }


def reward_statistics(chosen: ArrayLike, rejected: ArrayLike, data: str, all_rewards: ArrayLike | None = None,
                      margins: ArrayLike | None = None) -> dict:
    """What `reward_stats.json` holds for step 3's reward normalisation: the distribution over
    held-out answers, all together (`all_rewards`, default chosen + rejected: ranked lists have
    answers between best and worst) and best / worst apart; with the pairs' `margins` (best minus
    worst), how well sigmoid(margin) works as the probability that the best answer wins."""
    chosen, rejected = _vector(chosen), _vector(rejected)
    everything = np.concatenate([chosen, rejected]) if all_rewards is None else _vector(all_rewards)
    pairs = len(chosen) if margins is None else len(_vector(margins))  # tied best answers make one pair
    stats = {"data": data, "pairs": pairs, "all": reward_stats(everything),
             "chosen": reward_stats(chosen), "rejected": reward_stats(rejected)}
    if margins is not None:
        stats["calibration"] = {key: value for key, value in calibration(margins).items() if key != "bins"}
    return stats


def calibration(margins: ArrayLike, bins: int = 10) -> dict:
    """How well p = sigmoid(chosen - rejected) works as the probability that the chosen answer wins.

    `brier` and `log_loss` score p against the label "chosen wins"; `ece` is the top-label expected
    calibration error over `bins` equal-width confidence bins on [0.5, 1] (confidence max(p, 1 - p),
    correct 1 / 0.5 / 0 as the margin is positive / zero / negative, which is p > / = / < 0.5 without
    rounding). `bins` lists each bin's range, count and mean confidence and accuracy: a reliability diagram.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    margins = _vector(margins)
    edges = np.linspace(0.5, 1.0, bins + 1)
    confidence = _sigmoid(np.abs(margins))
    correct = (margins > 0) + 0.5 * (margins == 0)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(np.count_nonzero(members))
        row = {"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
               "confidence": None, "accuracy": None}
        if count:
            bin_confidence, bin_accuracy = confidence[members].mean(), correct[members].mean()
            row["confidence"], row["accuracy"] = _number(bin_confidence), _number(bin_accuracy)
            ece += count / len(margins) * abs(bin_accuracy - bin_confidence)
        table.append(row)
    if not len(margins):
        return {"brier": None, "log_loss": None, "ece": None, "bins": table}
    return {
        "brier": _number(np.mean((_sigmoid(margins) - 1.0) ** 2)),
        "log_loss": _number(np.mean(np.logaddexp(0.0, -margins))),
        "ece": _number(ece),
        "bins": table,
    }


def bucket_accuracy(chosen: ArrayLike, rejected: ArrayLike, keys: ArrayLike, edges: Sequence[float]) -> list[dict]:
    """Accuracy of the pairs whose key falls in each bucket [edges[j], edges[j+1]), the last one closed."""
    chosen, rejected, keys = _vector(chosen), _vector(rejected), _vector(keys)
    _same_length(chosen, rejected, keys)
    edges = [float(e) for e in edges]
    if any(b < a for a, b in pairwise(edges)):
        raise ValueError(f"bucket edges must be sorted: {edges}")
    buckets = []
    for j, (lower, upper) in enumerate(pairwise(edges)):
        last = j == len(edges) - 2
        members = (keys >= lower) & ((keys <= upper) if last else (keys < upper))
        buckets.append({"lower": lower, "upper": upper, "pairs": int(np.count_nonzero(members)),
                        "accuracy": _accuracy(chosen[members], rejected[members])})
    return buckets


def quantile_edges(values: ArrayLike, buckets: int = 4) -> list[float]:
    """Sorted unique quantile edges from min to max of the finite values, for roughly equal-count buckets;
    repeated values merge buckets, constant input gives one bucket [v, v], empty input none."""
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    values = _vector(values)
    values = values[np.isfinite(values)]
    if not len(values):
        return []
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, buckets + 1)))
    return [float(e) for e in edges] if len(edges) > 1 else [float(edges[0])] * 2


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their positions."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation; None with fewer than two points or a constant side."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    return _number(np.clip(np.sum(dx * dy) / np.sqrt(np.sum(dx * dx) * np.sum(dy * dy)), -1.0, 1.0))


def length_bias(chosen: ArrayLike, rejected: ArrayLike, chosen_lengths: ArrayLike,
                rejected_lengths: ArrayLike) -> dict:
    """Does the model reward length? Correlations of reward with answer length over all 2N answers; among
    pairs whose answers differ in length, how often the longer one gets the higher reward (ties half)
    compared with how often the data prefers it; the accuracy on pairs whose chosen answer is the longer
    one and on those where it is the shorter, and their mean: the accuracy on a length-balanced set
    (each kind weighing half), which a reward that only counts tokens scores 0.5 on."""
    chosen, rejected = _vector(chosen), _vector(rejected)
    chosen_lengths, rejected_lengths = _vector(chosen_lengths), _vector(rejected_lengths)
    _same_length(chosen, rejected, chosen_lengths, rejected_lengths)
    rewards = np.concatenate([chosen, rejected])
    lengths = np.concatenate([chosen_lengths, rejected_lengths])
    differ = chosen_lengths != rejected_lengths
    chosen_longer = chosen_lengths[differ] > rejected_lengths[differ]
    longer = np.where(chosen_longer, chosen[differ], rejected[differ])
    shorter = np.where(chosen_longer, rejected[differ], chosen[differ])
    some = bool(differ.any())
    wins = _wins(chosen[differ], rejected[differ])
    by_kind = [_number(wins[kind].mean()) if kind.any() else None for kind in (chosen_longer, ~chosen_longer)]
    return {
        **with_length({"reward": rewards}, lengths)["reward"],
        "longer_preferred_by_model": _number(_wins(longer, shorter).mean()) if some else None,
        "longer_preferred_by_data": _number(chosen_longer.mean()) if some else None,
        "pairs_with_different_lengths": int(np.count_nonzero(differ)),
        "accuracy_chosen_longer": by_kind[0],
        "accuracy_chosen_shorter": by_kind[1],
        "balanced_accuracy": None if None in by_kind else _number(np.mean(by_kind)),
    }


def with_length(values: dict[str, ArrayLike], lengths: ArrayLike) -> dict:
    """Pearson and Spearman correlation of each named array with `lengths` (None where undefined)."""
    lengths = _vector(lengths)
    size = _average_ranks(lengths)
    return {name: {"pearson": _pearson(_vector(value), lengths),
                   "spearman": _pearson(_average_ranks(_vector(value)), size)} for name, value in values.items()}


def calibration_effect(uncalibrated: ArrayLike, calibrated: ArrayLike, lengths: ArrayLike) -> dict:
    """How a length calibration changed the rewards' correlation with answer length, over every answer."""
    return with_length({"before calibration": uncalibrated, "after calibration (the reward)": calibrated}, lengths)


def correlation_table(title: str, label: str, correlations: dict) -> str:
    """A titled text table of `with_length`'s correlations, one row per named array."""
    return "\n".join([f"== {title}: correlation with answer length over every answer =="]
                     + text_table([label, "pearson", "spearman"],
                                  [[name, row["pearson"], row["spearman"]] for name, row in correlations.items()]))


def pair_report(chosen: ArrayLike, rejected: ArrayLike, chosen_lengths: ArrayLike, rejected_lengths: ArrayLike,
                pair_lengths: ArrayLike, sources: Sequence[str]) -> dict:
    """All of the above for one evaluation set, ready for `format_report` and `json.dump`."""
    chosen, rejected, pair_lengths = _vector(chosen), _vector(rejected), _vector(pair_lengths)
    names: dict[str, int] = {}  # one hashing pass however many sources, rather than a comparison per source
    source = np.fromiter((names.setdefault(str(s), len(names)) for s in sources), dtype=np.int64, count=len(sources))
    _same_length(chosen, rejected, pair_lengths, source)
    margins = chosen - rejected
    pairs, wins = np.bincount(source, minlength=len(names)), np.bincount(source, _wins(chosen, rejected), len(names))
    by_source = {name: {"pairs": int(pairs[names[name]]), "accuracy": _number(wins[names[name]] / pairs[names[name]])}
                 for name in sorted(names)}
    return {
        "summary": pair_summary(chosen, rejected),
        "by_source": by_source,
        "by_margin": bucket_accuracy(chosen, rejected, np.abs(margins), quantile_edges(np.abs(margins), 4)),
        "by_length": bucket_accuracy(chosen, rejected, pair_lengths, quantile_edges(pair_lengths, 4)),
        "length_bias": length_bias(chosen, rejected, chosen_lengths, rejected_lengths),
        "calibration": calibration(margins),
        "rewards": {"all": reward_stats(np.concatenate([chosen, rejected])),
                    "chosen": reward_stats(chosen), "rejected": reward_stats(rejected)},
    }


def best_worst(prompts: ArrayLike, targets: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt with two different known targets (combined labels; NaN unknown), in sorted prompt order, the
    positions of its best and worst response, the first one on a tie. Sorts, not a scan per prompt: O(R log R)."""
    targets = _vector(targets)
    known = np.flatnonzero(~np.isnan(targets))
    prompt = np.unique(np.asarray(prompts), return_inverse=True)[1].reshape(-1)[known]
    best, worst = (known[order[_run_starts(prompt[order])]]
                   for order in (np.lexsort((-targets[known], prompt)), np.lexsort((targets[known], prompt))))
    differ = targets[best] > targets[worst]
    return best[differ], worst[differ]


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Where each run of equal values begins."""
    return np.flatnonzero(np.append(True, values[1:] != values[:-1])) if len(values) else np.zeros(0, np.int64)


def rated_statistics(rewards: ArrayLike, prompts: ArrayLike, targets: ArrayLike, data: str) -> dict:
    """`reward_statistics` of rated responses: all their rewards, and each prompt's best and worst
    rated answer (by `targets`, the combined labels) as its pair."""
    rewards = _vector(rewards)
    best, worst = best_worst(prompts, targets)
    return reward_statistics(rewards[best], rewards[worst], data, all_rewards=rewards,
                             margins=rewards[best] - rewards[worst])


def attribute_report(predicted: np.ndarray, labels: np.ndarray, names: Sequence[str], rewards: ArrayLike,
                     prompts: ArrayLike, targets: ArrayLike, lengths: ArrayLike | None = None) -> dict:
    """A multi-attribute model on rated responses (`labels` NaN where not rated): per attribute,
    MSE, Pearson and Spearman correlation of prediction and label over its rated responses (and with
    `lengths`, each one's Spearman correlation with the response length, predicted and labelled:
    how much of an attribute is length); their means; and the pairwise accuracy of the reward on
    every two responses to one prompt whose `targets` (combined labels) differ, ties half (counted by sorting,
    `ranking_counts`, not by listing the pairs: a prompt with thousands of rated answers has millions)."""
    predicted, labels, rewards = np.asarray(predicted, np.float64), np.asarray(labels, np.float64), _vector(rewards)
    per_attribute = {}
    for k, name in enumerate(names):
        rated = ~np.isnan(labels[:, k])
        x, y = predicted[rated, k], labels[rated, k]
        row = {"rated": int(rated.sum()), "mse": _number(np.mean((x - y) ** 2)) if len(x) else None,
               "pearson": _pearson(x, y), "spearman": _pearson(_average_ranks(x), _average_ranks(y))}
        if lengths is not None:
            size = _average_ranks(_vector(lengths)[rated])
            row["length_spearman_predicted"] = _pearson(_average_ranks(x), size)
            row["length_spearman_labelled"] = _pearson(_average_ranks(y), size)
        per_attribute[name] = row
    from step2_reward_model.metrics import ranking_counts  # here: metrics imports torch, this module stays light

    targets = _vector(targets)
    known = ~np.isnan(targets)
    counts = ranking_counts(rewards[known], np.asarray(prompts).reshape(-1)[known], -targets[known])

    def mean(key: str) -> float | None:
        values = [row[key] for row in per_attribute.values() if row[key] is not None]
        return _number(np.mean(values)) if values else None

    return {"responses": len(rewards), "mse": mean("mse"), "pearson": mean("pearson"), "spearman": mean("spearman"),
            "comparisons": int(counts["pairs"]),
            "pairwise_accuracy": _number(counts["pairs_correct"] / counts["pairs"]) if counts["pairs"] else None,
            "attributes": per_attribute}


def format_attribute_report(report: dict) -> str:
    """`attribute_report`'s result as a plain-text table."""
    columns = ["rated", "mse", "pearson", "spearman", "length_spearman_predicted", "length_spearman_labelled"]
    columns = [c for c in columns if c in next(iter(report["attributes"].values()))]
    summary = [[key, report[key]] for key in ("responses", "mse", "pearson", "spearman", "comparisons",
                                              "pairwise_accuracy")]
    sections = [("Attributes", text_table(["attribute", *columns],
                                          [[name, *(row[c] for c in columns)] for name, row in
                                           report["attributes"].items()])),
                ("Attribute summary (means over attributes; pairwise accuracy of the combined reward)",
                 text_table(["metric", "value"], summary))]
    return "\n\n".join("\n".join([f"== {title} ==", *lines]) for title, lines in sections) + "\n"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Aligned columns: the first left-justified (labels), the others right-justified (numbers)."""
    cells = [list(header)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    lines = []
    for row in cells:
        parts = [row[0].ljust(widths[0])] + [text.rjust(width) for text, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(parts).rstrip())
    return lines


def _ranges(rows: list[dict]) -> list[str]:
    """Bucket labels: half-open, the last closed."""
    return [f"[{row['lower']:.4f}, {row['upper']:.4f}{']' if i == len(rows) - 1 else ')'}"
            for i, row in enumerate(rows)]


def _buckets_table(buckets: list[dict]) -> list[str]:
    return text_table(["range", "pairs", "accuracy"],
                  [[label, b["pairs"], b["accuracy"]] for label, b in zip(_ranges(buckets), buckets, strict=True)])


def format_report(report: dict) -> str:
    """`pair_report`'s result as plain-text tables for a terminal: 4 decimals, "-" where undefined."""
    calib, rewards = report["calibration"], report["rewards"]
    sections = [
        ("Summary", text_table(["metric", "value"], list(report["summary"].items()))),
        ("Per source", text_table(["source", "pairs", "accuracy"],
                              [[name, s["pairs"], s["accuracy"]] for name, s in report["by_source"].items()])),
        ("Accuracy by |margin|", _buckets_table(report["by_margin"])),
        ("Accuracy by pair length (tokens)", _buckets_table(report["by_length"])),
        ("Length bias", text_table(["metric", "value"], list(report["length_bias"].items()))),
        ("Calibration", text_table(["metric", "value"], [[k, calib[k]] for k in ("brier", "log_loss", "ece")])
         + [""] + text_table(["confidence bin", "count", "confidence", "accuracy"],
                         [[label, b["count"], b["confidence"], b["accuracy"]]
                          for label, b in zip(_ranges(calib["bins"]), calib["bins"], strict=True)])),
        ("Reward distribution", text_table(["stat", *rewards],
                                       [[key, *(stats[key] for stats in rewards.values())] for key in STAT_KEYS])),
    ]
    return "\n\n".join("\n".join([f"== {title} ==", *lines]) for title, lines in sections) + "\n"
