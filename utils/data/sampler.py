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

`TokenBudgetBatches` (`--max_tokens_per_batch`) sizes steps by tokens instead of examples: each
rank's share of a step holds as many documents (`utils/data/packing.py`) as fit in the budget, so
memory stays flat whatever the lengths. The number of examples per step then varies, so the loss
is a sum over examples divided by the step's `loss_denominator` (its examples over all ranks and
accumulated micro-batches, divided by their number): the per-example mean over the global batch,
whatever the packing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rlhf_reward.utils.data.collate import ATTENTION_WIDTH, RowShapes, padded_cost
from rlhf_reward.utils.data.packing import arrange, round_up
from torch.utils.data import Dataset, Sampler


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

    def batches_in(self, epoch: int) -> int:
        """Steps in `epoch` (the same in every epoch)."""
        return len(self)

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


class WithDenominator(Dataset):
    """`dataset`'s items for the (index, loss denominator) keys that `TokenBudgetBatches` yields."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, float]) -> dict:
        index, denominator = key
        return {**self.dataset[index], "loss_denominator": denominator}


class PackedShapes:
    """The rows and width a rank's share of a step packs into, for the memory estimate."""

    def __init__(self, sizes: np.ndarray, arrangement: str, multiple: int = 8):
        self.sizes, self.arrangement, self.multiple = np.asarray(sizes), arrangement, multiple

    def size(self, part: np.ndarray) -> tuple[int, int]:
        if self.arrangement == "flat":
            return 1, round_up(int(self.sizes[part].sum()), self.multiple)
        rows, width = arrange(self.sizes[part].tolist(), self.arrangement, self.multiple)
        return len(rows), width

    def cost(self, part: np.ndarray) -> float:
        return padded_cost(*self.size(part))


@dataclass(frozen=True)
class LossDenominator:
    """What `TokenBudgetBatches` counts for each step's loss denominator: the examples of a step vary,
    so the loss is averaged over all that its optimizer step trains on, across ranks and micro-batches."""

    units: np.ndarray | None = None  # per example what the loss averages over (a solution's labelled steps); None: 1
    accumulation: int = 1  # micro-batches per optimizer step
    epochs: int = 1  # epochs the run trains (the last optimizer step of an epoch may take micro-batches of the next)


class TokenBudgetBatches(Sampler[list[tuple[int, float]]]):
    """Batch sampler for this rank: documents of at most `budget` tokens per rank and step.

    Each epoch the examples are shuffled and cut into windows of about `window` steps; within a
    window they are sorted longest first and cut into budgets in that order, so a budget holds
    documents of similar length (first-fit rows then pad little), and consecutive budgets make
    the ranks' shares of a step. The steps are then shuffled, the costliest first, as in
    `LengthGroupedBatches`. `window` <= 0: budgets filled in shuffled order, no grouping. A document
    longer than the budget is a step's share alone. When the budgets do not divide among the ranks,
    the last step's missing shares repeat examples from the epoch's start (as DistributedSampler).

    `sizes` are the documents' tokens, `shapes` (if given) what their packed rows cost in memory."""

    def __init__(self, sizes: np.ndarray, budget: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 window: int = 32, denominator: LossDenominator | None = None, shapes: PackedShapes | None = None):
        if budget <= 0:
            raise ValueError(f"a token budget must be positive, not {budget}")
        denominator = denominator or LossDenominator()
        self.sizes = np.asarray(sizes, dtype=np.int64)
        units = denominator.units
        self.units = np.ones(len(self.sizes)) if units is None else np.asarray(units, dtype=np.float64)
        self.budget, self.rank, self.world_size, self.seed, self.window = budget, rank, world_size, seed, window
        self.accumulation, self.epochs, self.shapes = denominator.accumulation, denominator.epochs, shapes
        self.epoch, self.start = 0, 0
        self._batches: dict[int, list[list[np.ndarray]]] = {}

    @property
    def oversized(self) -> np.ndarray:
        """Examples longer than the budget (each trained alone in its share of a step)."""
        return np.flatnonzero(self.sizes > self.budget)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches_in(self.epoch)

    def batches_in(self, epoch: int) -> int:
        return len(self.global_batches(epoch))

    def parts(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        return batch

    def cost(self, batch: list[np.ndarray]) -> float:
        """The memory a step takes on the rank it costs most: tokens, and attention over the widest document."""
        if self.shapes is not None:
            return max(self.shapes.cost(part) for part in batch)
        return max(self.sizes[part].sum() * (1 + self.sizes[part].max() / ATTENTION_WIDTH) for part in batch)

    def budgets(self, order: np.ndarray) -> list[np.ndarray]:
        """The epoch's examples, shuffled in `order`, sorted longest first within windows, and cut
        into budgets in that order (a new one where the next example would overflow)."""
        if self.window > 0:
            per_step = max(1.0, self.world_size * self.budget / max(self.sizes.mean(), 1))
            span = max(1, round(self.window * per_step))
            order = np.concatenate([chunk[np.argsort(-self.sizes[chunk], kind="stable")]
                                    for chunk in np.array_split(order, max(1, -(-len(order) // span)))])
        out, current, used = [], [], 0
        for i in order.tolist():
            if current and used + self.sizes[i] > self.budget:
                out.append(np.array(current))
                current, used = [], 0
            current.append(i)
            used += self.sizes[i]
        return out + [np.array(current)]

    def global_batches(self, epoch: int | None = None) -> list[list[np.ndarray]]:
        """The epoch's steps in the order they run, each a list of every rank's share."""
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._batches:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.sizes))
            budgets = self.budgets(order)
            missing = -len(budgets) % self.world_size
            budgets += [order[i:i + 1] for i in range(missing)]
            steps = [budgets[i:i + self.world_size] for i in range(0, len(budgets), self.world_size)]
            costliest = max(range(len(steps)), key=lambda i: self.cost(steps[i]))
            self._batches[epoch] = [steps[costliest]] + [steps[i] for i in rng.permutation(len(steps))
                                                          if i != costliest]
        return self._batches[epoch]

    def denominators(self, epoch: int) -> list[float]:
        """Each of the epoch's steps' loss denominator: the units of its optimizer step (counted across
        the run's micro-batches, as DeepSpeed accumulates them) over its ranks and micro-batches."""
        first = sum(self.batches_in(e) for e in range(epoch))
        group_start = first // self.accumulation * self.accumulation
        group_end = math.ceil((first + self.batches_in(epoch)) / self.accumulation) * self.accumulation
        totals: dict[int, float] = {}
        micro = 0
        for e in range(max(self.epochs, epoch + 1)):
            for batch in self.global_batches(e):
                if group_start <= micro < group_end:
                    group = micro // self.accumulation
                    totals[group] = totals.get(group, 0.0) + sum(self.units[part].sum() for part in batch)
                micro += 1
            if micro >= group_end:
                break
        scale = self.world_size * self.accumulation
        return [totals[(first + b) // self.accumulation] / scale for b in range(self.batches_in(epoch))]

    def __iter__(self):
        denominators = self.denominators(self.epoch)
        for b, batch in enumerate(self.global_batches(self.epoch)[self.start:], start=self.start):
            yield [(int(i), denominators[b]) for i in batch[self.rank]]
