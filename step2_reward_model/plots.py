"""PNG figures of a reward model's evaluation, for `rw_eval.py --plots DIR`.

Three pictures answer at a glance what the report's tables say in numbers: how far apart the
chosen and rejected rewards are, whether reward simply follows answer length, and whether the
margins are calibrated. Figures are drawn on `Figure` + `FigureCanvasAgg` directly, never pyplot:
no display, no global figure registry to leak into, and safe beside other matplotlib users.
matplotlib is imported inside `write_plots`, so importing this module costs nothing.
"""

from __future__ import annotations

import os

import numpy as np

from step2_reward_model.report import ArrayLike

CHOSEN_COLOUR, REJECTED_COLOUR = "tab:blue", "tab:orange"


def _title_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_plots(chosen: ArrayLike, rejected: ArrayLike, chosen_lengths: ArrayLike, rejected_lengths: ArrayLike,
                report: dict, folder: str) -> list[str]:
    """Write reward_histogram.png, reward_vs_length.png and reliability.png into `folder` (made if
    missing), from the per-pair arrays and `pair_report`'s result; return their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen, rejected = np.asarray(chosen, dtype=float), np.asarray(rejected, dtype=float)
    drawable = np.isfinite(chosen) & np.isfinite(rejected)  # a diverged model's inf/NaN cannot be drawn
    chosen, rejected = chosen[drawable], rejected[drawable]
    chosen_lengths, rejected_lengths = np.asarray(chosen_lengths)[drawable], np.asarray(rejected_lengths)[drawable]
    os.makedirs(folder, exist_ok=True)
    paths = []

    def save(figure: Figure, name: str) -> None:
        path = os.path.join(folder, name)
        figure.tight_layout()
        FigureCanvasAgg(figure).print_png(path)
        paths.append(path)

    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    bins = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=40)
    axes.hist(chosen, bins=bins, alpha=0.55, color=CHOSEN_COLOUR, label=f"chosen (n={len(chosen)})")
    axes.hist(rejected, bins=bins, alpha=0.55, color=REJECTED_COLOUR, label=f"rejected (n={len(rejected)})")
    axes.set(xlabel="reward", ylabel="answers", title="Rewards of chosen and rejected answers")
    axes.legend()
    save(figure, "reward_histogram.png")

    figure = Figure(figsize=(7, 4.5), dpi=100)
    axes = figure.add_subplot()
    axes.scatter(chosen_lengths, chosen, s=8, alpha=0.5, color=CHOSEN_COLOUR, label="chosen")
    axes.scatter(rejected_lengths, rejected, s=8, alpha=0.5, color=REJECTED_COLOUR, label="rejected")
    pearson = _title_number(report["length_bias"]["pearson"])
    axes.set(xlabel="answer length (tokens)", ylabel="reward", title=f"Reward vs answer length (pearson r = {pearson})")
    axes.legend()
    save(figure, "reward_vs_length.png")

    calib = report["calibration"]
    filled = [b for b in calib["bins"] if b["count"]]
    figure = Figure(figsize=(5.5, 5), dpi=100)
    axes = figure.add_subplot()
    axes.bar([(b["lower"] + b["upper"]) / 2 for b in filled], [b["accuracy"] for b in filled],
             width=[b["upper"] - b["lower"] for b in filled], color=CHOSEN_COLOUR, alpha=0.7, edgecolor="black",
             label="accuracy per bin")
    axes.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="black", markersize=4,
              label="mean confidence")
    axes.plot([0.5, 1.0], [0.5, 1.0], "--", color="gray", label="perfectly calibrated")
    axes.set(xlim=(0.5, 1.0), ylim=(0.0, 1.0), xlabel="confidence max(p, 1 - p)", ylabel="accuracy",
             title=f"Reliability (ECE = {_title_number(calib['ece'])})")
    axes.legend(loc="upper left")
    save(figure, "reliability.png")
    return paths
