"""Evaluation metrics and plots against values worked out by hand or by an independent formula."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from step2_reward_model.plots import write_plots
from step2_reward_model.report import (
    bucket_accuracy,
    calibration,
    format_report,
    length_bias,
    pair_report,
    pair_summary,
    quantile_edges,
    reward_stats,
)

LN3, LN19 = math.log(3.0), math.log(19.0)  # sigmoid: 0.75 and 0.95


def random_pairs(n: int = 200, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    chosen_lengths, rejected_lengths = rng.integers(5, 60, n), rng.integers(5, 60, n)
    return {
        "chosen": rng.normal(0.8, 1.0, n) + 0.01 * chosen_lengths,
        "rejected": rng.normal(0.0, 1.0, n),
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "pair_lengths": np.maximum(chosen_lengths, rejected_lengths) + rng.integers(3, 30, n),
        "sources": rng.choice(["hh", "webgpt", "synthetic"], n),
    }


def assert_plain_json(value: object) -> None:
    """Only python builtins that JSON writes as they are: no numpy scalars, no NaN or inf."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain_json(item)
    else:
        assert value is None or type(value) in (str, int, float, bool), (value, type(value))
        assert not isinstance(value, float) or math.isfinite(value)


def test_pair_summary_by_hand():
    summary = pair_summary([2.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 0.0])
    assert summary["pairs"] == 4 and summary["ties"] == 1
    assert summary["accuracy"] == pytest.approx(0.625)  # win, tie, loss, win
    assert summary["chosen_mean"] == pytest.approx(1.5)
    assert summary["chosen_std"] == pytest.approx(math.sqrt(1.25))
    assert summary["rejected_mean"] == pytest.approx(0.75)
    assert summary["rejected_std"] == pytest.approx(math.sqrt(0.1875))
    assert summary["margin_mean"] == pytest.approx(0.75)  # margins 1, 0, -1, 3
    assert summary["margin_std"] == pytest.approx(math.sqrt(2.1875))
    assert_plain_json(summary)


def test_pair_summary_empty_and_mismatched():
    summary = pair_summary([], [])
    assert summary["pairs"] == 0 and summary["ties"] == 0  # counts stay numbers (training logs them as scalars)
    assert all(value is None for key, value in summary.items() if key not in ("pairs", "ties"))
    assert set(summary) == set(pair_summary([1.0], [0.0]))
    with pytest.raises(ValueError):
        pair_summary([1.0, 2.0], [0.0])


def test_reward_stats_against_numpy():
    rewards = np.random.default_rng(1).normal(size=101)
    stats = reward_stats(rewards)
    assert list(stats) == ["count", "mean", "std", "min", "q05", "q25", "median", "q75", "q95", "max"]
    assert stats["count"] == 101
    assert stats["mean"] == pytest.approx(float(np.mean(rewards)))
    assert stats["std"] == pytest.approx(float(np.std(rewards)))
    assert stats["min"] == rewards.min() and stats["max"] == rewards.max()
    for key, q in (("q05", 0.05), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("q95", 0.95)):
        assert stats[key] == pytest.approx(float(np.quantile(rewards, q)))
    assert_plain_json(stats)
    assert reward_stats([]) == {"count": 0, **dict.fromkeys(list(stats)[1:])}


def test_calibration_by_hand():
    margins = [LN3, LN3, -LN3, LN19, LN19, LN19, -LN19, 0.0]
    result = calibration(margins, bins=5)  # bins of width 0.1 over [0.5, 1]
    # confidence .75 x3 (2 correct), .95 x4 (3 correct), .5 x1 (a tie: correct 0.5)
    assert [b["count"] for b in result["bins"]] == [1, 0, 3, 0, 4]
    assert [b["lower"] for b in result["bins"]] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert [b["upper"] for b in result["bins"]] == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0])
    assert result["bins"][1]["confidence"] is None and result["bins"][1]["accuracy"] is None
    assert result["bins"][0]["confidence"] == pytest.approx(0.5) and result["bins"][0]["accuracy"] == 0.5
    assert result["bins"][2]["confidence"] == pytest.approx(0.75)
    assert result["bins"][2]["accuracy"] == pytest.approx(2 / 3)
    assert result["bins"][4]["confidence"] == pytest.approx(0.95) and result["bins"][4]["accuracy"] == 0.75
    assert result["ece"] == pytest.approx(3 / 8 * (0.75 - 2 / 3) + 4 / 8 * (0.95 - 0.75))
    p = [0.75, 0.75, 0.25, 0.95, 0.95, 0.95, 0.05, 0.5]
    assert result["brier"] == pytest.approx(sum((x - 1) ** 2 for x in p) / 8)
    assert result["log_loss"] == pytest.approx(-sum(math.log(x) for x in p) / 8)
    assert_plain_json(result)


def test_calibration_is_stable_and_covers_every_pair():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extreme = calibration([1000.0, -1000.0])
    assert extreme["log_loss"] == pytest.approx(500.0) and extreme["brier"] == pytest.approx(0.5)
    assert extreme["bins"][-1]["count"] == 2 and extreme["bins"][-1]["accuracy"] == 0.5  # confidence 1.0: last bin
    assert extreme["ece"] == pytest.approx(0.5)
    on_edge = calibration([LN3, -LN3], bins=2)["bins"]  # confidence exactly 0.75: the upper bin's lower edge
    assert on_edge[1]["lower"] == on_edge[1]["confidence"] == 0.75 and [b["count"] for b in on_edge] == [0, 2]

    margins = np.random.default_rng(2).normal(0.5, 2.0, 500)
    result = calibration(margins, bins=7)
    assert len(result["bins"]) == 7 and sum(b["count"] for b in result["bins"]) == 500
    overall = sum(b["count"] * b["accuracy"] for b in result["bins"] if b["count"]) / 500
    assert overall == pytest.approx(float(np.mean(margins > 0)))

    empty = calibration([])
    assert empty["brier"] is None and empty["log_loss"] is None and empty["ece"] is None
    assert all(b["count"] == 0 and b["accuracy"] is None for b in empty["bins"])
    with pytest.raises(ValueError):
        calibration([1.0], bins=0)


def test_bucket_accuracy_half_open_with_last_closed():
    keys = [0.0, 1.0, 1.0, 2.0, 3.0, 3.0, 4.0]
    chosen = [1.0, 1.0, 0.0, 5.0, 2.0, 2.0, 0.0]
    rejected = [0.0, 0.0, 1.0, 5.0, 1.0, 1.0, 1.0]
    buckets = bucket_accuracy(chosen, rejected, keys, [0.0, 1.0, 1.5, 2.0, 3.0])
    assert [(b["lower"], b["upper"]) for b in buckets] == [(0.0, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, 3.0)]
    assert [b["pairs"] for b in buckets] == [1, 2, 0, 3]  # key 4 is outside every bucket
    assert buckets[0]["accuracy"] == 1.0 and buckets[1]["accuracy"] == 0.5
    assert buckets[2]["accuracy"] is None
    assert buckets[3]["accuracy"] == pytest.approx(2.5 / 3)  # a tie and two wins, key 3.0 on the closed end
    assert_plain_json(buckets)
    with pytest.raises(ValueError):
        bucket_accuracy(chosen, rejected, keys, [0.0, 2.0, 1.0])


def test_quantile_edges():
    assert quantile_edges(np.arange(1, 10), 4) == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert quantile_edges([0, 0, 0, 0, 0, 0, 1, 2], 4) == pytest.approx([0.0, 0.25, 2.0])  # repeated edges merge
    assert quantile_edges([2.0, 2.0, 2.0], 4) == [2.0, 2.0]
    assert quantile_edges([], 4) == []
    single = bucket_accuracy([1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [2.0, 2.0, 2.0], quantile_edges([2.0, 2.0, 2.0]))
    assert len(single) == 1 and single[0]["pairs"] == 3 and single[0]["accuracy"] == pytest.approx(0.5)
    values = np.random.default_rng(3).integers(0, 20, 300).astype(float)
    edges = quantile_edges(values, 4)
    assert edges[0] == values.min() and edges[-1] == values.max() and edges == sorted(set(edges))
    assert sum(b["pairs"] for b in bucket_accuracy(values, values, values, edges)) == 300


def test_length_bias_by_hand():
    chosen, rejected = [3.0, 1.0, 2.0, 4.0], [2.0, 0.0, 5.0, 4.0]
    chosen_lengths, rejected_lengths = [10, 20, 20, 7], [30, 5, 20, 9]
    result = length_bias(chosen, rejected, chosen_lengths, rejected_lengths)
    rewards, lengths = chosen + rejected, chosen_lengths + rejected_lengths
    assert result["pearson"] == pytest.approx(np.corrcoef(rewards, lengths)[0, 1])
    reward_ranks = [5, 2, 3.5, 6.5, 3.5, 1, 8, 6.5]  # ranked by hand, ties averaged
    length_ranks = [4, 6, 6, 2, 8, 1, 6, 3]
    assert result["spearman"] == pytest.approx(np.corrcoef(reward_ranks, length_ranks)[0, 1])
    # pair 0: longer (rejected) loses; pair 1: longer (chosen) wins; pair 2: same length; pair 3: tie
    assert result["pairs_with_different_lengths"] == 3
    assert result["longer_preferred_by_model"] == pytest.approx(0.5)
    assert result["longer_preferred_by_data"] == pytest.approx(1 / 3)
    # pair 1 has the longer answer chosen (right); pairs 0 and 3 the shorter (right, tie)
    assert result["accuracy_chosen_longer"] == 1.0
    assert result["accuracy_chosen_shorter"] == pytest.approx(0.75)
    assert result["balanced_accuracy"] == pytest.approx(0.875)
    assert_plain_json(result)


def test_spearman_is_rank_based():
    lengths = np.arange(1, 21, dtype=float)
    rewards = np.exp(lengths / 3)  # monotone, far from linear
    result = length_bias(rewards[:10], rewards[10:], lengths[:10], lengths[10:])
    assert result["spearman"] == pytest.approx(1.0)
    assert result["pearson"] < 0.95
    flipped = length_bias(-rewards[:10], -rewards[10:], lengths[:10], lengths[10:])
    assert flipped["spearman"] == pytest.approx(-1.0)


def test_length_bias_undefined_cases():
    constant = length_bias([1.0, 2.0], [0.0, 3.0], [7, 7], [7, 7])
    assert constant == {"pearson": None, "spearman": None, "longer_preferred_by_model": None,
                        "longer_preferred_by_data": None, "pairs_with_different_lengths": 0,
                        "accuracy_chosen_longer": None, "accuracy_chosen_shorter": None, "balanced_accuracy": None}
    flat = length_bias([0.1, 0.1, 0.1], [0.1, 0.1, 0.1], [1, 2, 3], [4, 5, 6])
    assert flat["pearson"] is None and flat["spearman"] is None
    assert flat["longer_preferred_by_model"] == 0.5 and flat["longer_preferred_by_data"] == 0.0
    assert length_bias([], [], [], [])["pearson"] is None


def test_pair_report_matches_parts_and_is_json():
    data = random_pairs()
    report = pair_report(**data)
    assert report == json.loads(json.dumps(report, allow_nan=False))
    assert_plain_json(report)
    chosen, rejected = data["chosen"], data["rejected"]
    assert report["summary"] == pair_summary(chosen, rejected)
    assert list(report["by_source"]) == ["hh", "synthetic", "webgpt"]
    for name, entry in report["by_source"].items():
        members = data["sources"] == name
        assert entry["pairs"] == int(members.sum())
        assert entry["accuracy"] == pytest.approx(float(np.mean(chosen[members] > rejected[members])))
    assert len(report["by_margin"]) == 4 and sum(b["pairs"] for b in report["by_margin"]) == 200
    assert report["by_margin"][-1]["accuracy"] > report["by_margin"][0]["accuracy"]  # big margins: more often right
    assert report["by_length"][0]["lower"] == data["pair_lengths"].min()
    assert sum(b["pairs"] for b in report["by_length"]) == 200
    assert report["length_bias"]["pearson"] == pytest.approx(
        np.corrcoef(np.concatenate([chosen, rejected]),
                    np.concatenate([data["chosen_lengths"], data["rejected_lengths"]]))[0, 1])
    assert report["calibration"] == calibration(chosen - rejected)
    assert report["rewards"]["all"]["count"] == 400
    assert report["rewards"]["chosen"] == reward_stats(chosen)
    assert report["rewards"]["rejected"] == reward_stats(rejected)


def test_pair_report_degenerate_inputs_stay_json():
    ties = pair_report([1.0] * 5, [1.0] * 5, [4] * 5, [4] * 5, [9] * 5, ["a"] * 5)
    json.dumps(ties, allow_nan=False)
    assert ties["summary"]["accuracy"] == 0.5 and ties["summary"]["ties"] == 5
    assert ties["length_bias"]["pearson"] is None
    assert len(ties["by_length"]) == 1 and ties["by_length"][0]["pairs"] == 5
    with np.errstate(invalid="ignore"):  # a diverged model: NaN and inf rewards become None, not invalid JSON
        broken = pair_report([np.nan, 1.0, 2.0], [0.0, np.inf, 1.0], [1, 2, 3], [3, 2, 1], [4, 5, 6], ["a"] * 3)
    json.dumps(broken, allow_nan=False)
    assert broken["summary"]["chosen_mean"] is None and broken["by_margin"][0]["lower"] == 1.0
    empty = pair_report([], [], [], [], [], [])
    json.dumps(empty, allow_nan=False)
    assert empty["summary"]["pairs"] == 0 and empty["by_source"] == {} and empty["by_margin"] == []
    assert "==" in format_report(empty)


def test_format_report_is_plain_aligned_text():
    report = pair_report([2.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 0.0], [5, 6, 7, 8], [8, 7, 6, 5], [20, 20, 20, 20],
                         ["x", "y", "x", "y"])
    text = format_report(json.loads(json.dumps(report)))
    for title in ("Summary", "Per source", "margin", "length", "Length bias", "Calibration", "Reward distribution"):
        assert title in text
    assert "0.6250" in text and "\x1b" not in text and "None" not in text and "nan" not in text
    summary_lines = text.split("\n\n")[0].splitlines()[1:]
    assert len({len(line) for line in summary_lines}) == 1  # right-aligned value column
    calibration_bins = [line for line in text.splitlines() if line.startswith("[0.6000, 0.6500)")]
    assert calibration_bins and calibration_bins[0].split()[-2:] == ["-", "-"]  # empty bin


def test_imports_stay_light():
    code = ("import sys, step2_reward_model.report, step2_reward_model.plots; "
            "print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("pairs", [300, 0])
def test_write_plots(tmp_path, pairs):
    data = random_pairs(pairs, seed=4)
    report = pair_report(**data)
    folder = tmp_path / "nested" / "plots"
    del data["pair_lengths"], data["sources"]
    paths = write_plots(**data, report=report, folder=str(folder))
    names = ["reward_histogram.png", "reward_vs_length.png", "reliability.png"]
    assert paths == [str(folder / name) for name in names]
    for path in paths:
        with open(path, "rb") as handle:
            content = handle.read()
        assert content.startswith(b"\x89PNG\r\n\x1a\n") and len(content) > 5000
