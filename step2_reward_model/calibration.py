"""Post-hoc length calibration (`export.py --length_calibration`): the reward minus its local mean at the
answer's length, for a model trained without `--length_head`.

After Huang et al. 2024, "Post-hoc Reward Calibration: A Case Study on Length Bias": the reward is read
as quality plus a bias that depends on length only; the bias is estimated by locally weighted linear
regression (LWR, one LOWESS pass with tricube weights over the nearest `fraction` of the answers) of the
held-out rewards on the answers' token lengths, and subtracted. The curve is kept at `KNOTS` quantiles
of the lengths and read between them by linear interpolation, flat beyond the ends, so applying it is
one `np.interp` and the fit costs O(knots x answers). Offsets are the curve minus the mean held-out
reward, so the calibrated rewards keep their mean.

Length is the answer's tokens after the prompt, as training's length diagnostics count them (the
response with its end-of-conversation token or the template's end of turn). A linear head cannot see
that number, so the calibration cannot be folded into the weights: it lives in the manifest
(`reward_model.json`, key `length_calibration`, in OUTPUT and `hf/`) and `Scorer` applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rlhf_reward.utils.errors import UserError

KNOTS = 32
FRACTION = 0.3  # of the answers each local fit weighs


@dataclass(frozen=True)
class LengthCalibration:
    lengths: tuple[float, ...]  # the knots: quantiles of the held-out answers' lengths, ascending
    offsets: tuple[float, ...]  # the estimated bias at each knot, minus the mean reward
    fraction: float = FRACTION
    answers: int = 0  # how many answers it was fitted on
    data: str = ""  # what they were

    def offset(self, lengths: np.ndarray) -> np.ndarray:
        """The bias to subtract at each length: linear between knots, the end value beyond them."""
        return np.interp(np.asarray(lengths, dtype=np.float64), self.lengths, self.offsets)

    def apply(self, rewards: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return np.asarray(rewards, dtype=np.float64) - self.offset(lengths)

    def manifest(self) -> dict:
        return {"method": "lowess", "length": "answer tokens", "fraction": self.fraction, "answers": self.answers,
                "data": self.data, "lengths": list(self.lengths), "offsets": list(self.offsets)}

    @classmethod
    def from_manifest(cls, manifest: dict) -> LengthCalibration | None:
        fields = manifest.get("length_calibration")
        if fields is None:
            return None
        lengths, offsets = fields.get("lengths"), fields.get("offsets")
        if (not isinstance(lengths, list) or not isinstance(offsets, list) or not lengths
                or len(lengths) != len(offsets) or np.any(np.diff(lengths) <= 0)):
            raise UserError("the manifest's length_calibration needs ascending 'lengths' and as many 'offsets' "
                            "(write it again with export.py --length_calibration)")
        return cls(tuple(map(float, lengths)), tuple(map(float, offsets)), float(fields.get("fraction", FRACTION)),
                   int(fields.get("answers", 0)), str(fields.get("data", "")))


def local_linear(lengths: np.ndarray, rewards: np.ndarray, at: float, fraction: float) -> float:
    """The LOWESS estimate at `at`: a linear fit of rewards on lengths weighted by the tricube of the
    distance, over the nearest `fraction` of the points (a flat weighted mean where their lengths agree)."""
    distance = np.abs(lengths - at)
    nearest = max(2, math.ceil(fraction * len(lengths)))
    width = np.partition(distance, min(nearest, len(lengths)) - 1)[min(nearest, len(lengths)) - 1]
    width = max(width, 1.0) * (1 + 1e-9)  # lengths are whole tokens: a window at least one token wide
    weight = np.clip(1 - (distance / width) ** 3, 0, None) ** 3
    total = weight.sum()
    mean_length, mean_reward = weight @ lengths / total, weight @ rewards / total
    spread = weight @ (lengths - mean_length) ** 2
    slope = weight @ ((lengths - mean_length) * (rewards - mean_reward)) / spread if spread > 1e-12 * total else 0.0
    return float(mean_reward + slope * (at - mean_length))


def fit_length_calibration(lengths: np.ndarray, rewards: np.ndarray, data: str = "", knots: int = KNOTS,
                           fraction: float = FRACTION) -> LengthCalibration:
    """The calibration of these rewards against their answers' lengths (one per answer)."""
    lengths, rewards = np.asarray(lengths, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    if len(lengths) < 2 or len(np.unique(lengths)) < 2:
        raise UserError(f"--length_calibration: {len(lengths)} held-out answers of "
                        f"{len(np.unique(lengths))} length(s); it needs answers of different lengths")
    at = np.unique(np.quantile(lengths, np.linspace(0, 1, knots)))
    mean = float(rewards.mean())
    offsets = [local_linear(lengths, rewards, x, fraction) - mean for x in at]
    return LengthCalibration(tuple(at.tolist()), tuple(offsets), fraction, len(lengths), data)
