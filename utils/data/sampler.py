"""Training batches of similar length, still in random order.

Padding to the batch's longest wastes little when a batch's examples have similar lengths. Each
epoch the examples are shuffled, cut into windows of `window` global steps, sorted by length
within a window and cut into batches; the batches are then shuffled. Which examples share a
batch, and the order of the batches, change every epoch, as with a plain shuffle. Every rank
takes its slice of the same global batch, so all ranks run the same number of steps on similar
lengths. The batch that costs the most memory runs first, so a memory limit shows at step 1: with
`shapes`, the one with the most rows x padded length (attention counted too) on any rank, as a
ranked list adds a row per response and a packed row is as long as all its responses; without,
the one holding the longest example.
An epoch's order depends only on the seed and the epoch, so a resumed run starts an epoch part
way (`set_epoch(epoch, start)`) on exactly the batches the interrupted run had not yet taken.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

from utils.data.collate import RowShapes


class LengthGroupedBatches(Sampler[list[int]]):
    """Batch sampler for this rank: `batch_size` examples per rank and step. `window` <= 0 turns
    the grouping off (a plain shuffle, batched), for comparison."""

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, window: int = 64, shapes: RowShapes | None = None):
        self.lengths = np.asarray(lengths)
        self.shapes = shapes
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.window, self.epoch, self.start = seed, window, 0, 0
        # As DistributedSampler: repeat examples so that every rank gets the same number.
        self.total = math.ceil(len(self.lengths) / world_size) * world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Run `epoch`'s batches from batch `start` on (`len` still counts the whole epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return math.ceil(self.total / (self.batch_size * self.world_size))

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's batches of all ranks together, in the order they run."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        order = np.resize(order, self.total)  # wraps around to pad
        step = self.batch_size * self.world_size
        if self.window <= 0:
            return [order[i:i + step] for i in range(0, self.total, step)]
        batches = []
        for start in range(0, self.total, step * self.window):
            chunk = order[start:start + step * self.window]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + step] for i in range(0, len(chunk), step)]
        costliest = max(range(len(batches)), key=lambda i: self.cost(batches[i]))
        rest = [batches[i] for i in rng.permutation(len(batches)) if i != costliest]
        return [batches[costliest], *rest]

    def parts(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every rank's share of a global batch."""
        return np.array_split(batch, self.world_size)

    def cost(self, batch: np.ndarray) -> float:
        """The memory a global batch takes on the rank it costs most."""
        if self.shapes is None:
            return self.lengths[batch].max()
        return max(self.shapes.cost(part) for part in self.parts(batch))

    def __iter__(self):
        for batch in self.global_batches()[self.start:]:
            yield self.parts(batch)[self.rank].tolist()
