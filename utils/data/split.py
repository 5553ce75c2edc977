"""DeepSpeed-Chat's `--data_split` semantics: one seeded shuffle of a split, cut into per-phase slices.

`--data_split 2,4,4` gives 20 % of each split to SFT, 40 % to the reward model (phase 2) and 40 %
to PPO, so the three steps never train on the same rows. The shuffled index is cached as `.npy`
under `--data_output_path` (no pickles) and keyed by source, seed, split, proportions and size.
"""

from __future__ import annotations

import os

import numpy as np
from rlhf_reward.utils.errors import UserError
from rlhf_reward.utils.files import atomic_write


def parse_split(data_split: str) -> list[float]:
    try:
        parts = [float(part) for part in data_split.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(part < 0 for part in parts) or sum(parts) <= 0:
        raise UserError(f"--data_split '{data_split}': expected three non-negative numbers such as 2,4,4")
    return parts


def split_bounds(proportions: list[float], size: int) -> list[int]:
    """Slice boundaries of `size` rows cut in the given proportions, rounding as DeepSpeed-Chat."""
    total = sum(proportions)
    bounds = [0]
    for part in proportions:
        bounds.append(bounds[-1] + int(round(part / total * size)))
    overshoot = bounds[-1] - size
    return [bounds[0]] + [bound - overshoot for bound in bounds[1:]]


def shuffle_order(size: int, seed: int) -> list[int]:
    """The seeded shuffle DeepSpeed-Chat applies to a split before cutting it, and to several sources
    concatenated."""
    order = np.arange(size, dtype=np.int64)
    np.random.RandomState(seed=seed).shuffle(order)
    return order.tolist()


def phase_indices(size: int, data_split: str, phase_index: int, seed: int,
                  cache_dir: str | None = None, key: str = "data") -> list[int]:
    """Row indices of slice `phase_index` (0-based: the reward model is 1) of a seeded shuffle."""
    name = f"{key}_seed{seed}_{data_split}_{size}_{phase_index}.npy"
    path = os.path.join(cache_dir, name) if cache_dir else None
    if path and os.path.isfile(path):
        return np.load(path, allow_pickle=False).tolist()
    bounds = split_bounds(parse_split(data_split), size)
    chosen = shuffle_order(size, seed)[bounds[phase_index]:bounds[phase_index + 1]]
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        with atomic_write(path, "wb") as handle:
            np.save(handle, np.array(chosen, dtype=np.int64), allow_pickle=False)
    return chosen
