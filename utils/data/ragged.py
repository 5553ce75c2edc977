"""Ragged arrays (one array per example, of different lengths) as one flat array and its offsets.

The tokenised caches are `.npz` files, which hold rectangular arrays only: storing a list of arrays as one
flat array and where each one starts keeps them loadable without pickles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Where each of the pieces of `lengths` starts in their concatenation, and (last) where they all end."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def pack(arrays: list[np.ndarray], dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """The arrays concatenated as `dtype`, and their `offsets`."""
    data = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)
    return data, offsets([len(array) for array in arrays])


def unpack(flat: np.ndarray | list, starts: np.ndarray) -> list:
    """The pieces of `flat` that `starts` (as from `offsets`) marks out."""
    return [flat[starts[i]:starts[i + 1]] for i in range(len(starts) - 1)]
